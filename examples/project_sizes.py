"""Projected T5-base cache sizes for QQP and MNLI, whose files are not on this machine (docs/storage.md).

    python examples/project_sizes.py --config ../shared/t5-configs/t5-base.json --tokenizer ../shared/t5-tokenizer --glue ../shared/glue

`read-cache build --dry-run` tokenises a task's real files; where they are absent (QQP, MNLI here) this
script projects from the hub's GLUE row counts and token lengths of similar local text, with the real
T5 tokenizer and the task's real T5 template:
  QQP  "qqp question1: {q1} question2: {q2}": q1 and q2 drawn from the QNLI dev questions (SQuAD questions,
       like Quora's a single short question each);
  MNLI "mnli hypothesis: {h} premise: {p}": p drawn from MRPC sentences (news, ~the length of MNLI premises),
       h from STS-B sentences (short captions and headlines, ~the length of MNLI hypotheses).
Each projected example is a real template filled with two randomly drawn local texts (seeded), so the
template's own tokens are counted exactly; sizes are then what `Geometry` gives for the mean length.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from read_cache.backbone.load import model_dims
from read_cache.build.identity import dims_geometry
from read_cache.config import BuildConfig
from read_cache.store.formats import STORE_DTYPES

# Hub GLUE row counts, after read-cache's split recipe (>= 10k train: 1k of train held out as validation,
# the original validation as test; MNLI: mismatched -> validation, matched -> test).
ROWS = {
    "qqp": {"train": 363_846 - 1_000, "validation": 1_000, "test": 40_430},
    "mnli": {"train": 392_702, "validation": 9_832, "test": 9_815},
}


def column(path: Path, name: str) -> list[str]:
    with path.open(newline="") as f:
        return [row[name] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row.get(name)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--glue", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=5000)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    config = AutoConfig.from_pretrained(args.config)
    questions = column(args.glue / "QNLI" / "dev.tsv", "question")
    premises = column(args.glue / "MRPC" / "train.tsv", "#1 String") + column(args.glue / "MRPC" / "train.tsv", "#2 String")
    hypotheses = column(args.glue / "STS-B" / "train.tsv", "sentence1") + column(args.glue / "STS-B" / "train.tsv", "sentence2")
    rng = random.Random(0)
    texts = {
        "qqp": [f"qqp question1: {rng.choice(questions)} question2: {rng.choice(questions)}" for _ in range(args.samples)],
        "mnli": [f"mnli hypothesis: {rng.choice(hypotheses)} premise: {rng.choice(premises)}" for _ in range(args.samples)],
    }
    print(f"T5 {args.config.name}: projected caches (hub row counts x mean tokens of {args.samples:,} sampled examples)\n")
    print("| task | examples | tokens/example | tokens | " + " | ".join(f"{f} GB" for f in STORE_DTYPES) + " |")
    print("|---|---|---|---|" + "---|" * len(STORE_DTYPES))
    for task, rows in ROWS.items():
        lengths = [len(ids) for ids in tok(texts[task])["input_ids"]]
        mean = sum(lengths) / len(lengths)
        examples = sum(rows.values())
        tokens = int(mean * examples)
        cfg = BuildConfig(model=str(args.config), task=task)
        sizes = [dims_geometry(model_dims(config, "t5"), "t5", cfg, False, fmt).projected_disk_bytes(tokens, examples) / 1e9 for fmt in STORE_DTYPES]
        print(f"| {task} | {examples:,} | {mean:.1f} | {tokens / 1e6:.1f} M | " + " | ".join(f"{s:,.1f}" for s in sizes) + " |")


if __name__ == "__main__":
    sys.exit(main())
