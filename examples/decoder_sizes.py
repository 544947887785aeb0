"""Projected decoder-only caches (docs/decoder-only.md): 0.5 B, 1 B and 8 B models on SST-2 and QQP, every format,
every token or the readout token alone (`build --tokens last`).

    python examples/decoder_sizes.py --tokenizer ../shared/t5-tokenizer --glue ../shared/glue

Shapes are the public configs' (layers, width); sizes are what `Geometry` projects (the store's measured bytes per
value, docs/storage.md). Tokens per example come from the default prompt (`TaskSpec.lm_template`) filled with real
text: SST-2's own sentences; QQP's files are not here, so its question pairs are drawn from QNLI's dev questions
as examples/project_sizes.py does. The tokenizer must be a real one that loads offline: T5's 32k sentencepiece
vocabulary is the one on this machine; Llama 3's and Qwen's larger vocabularies cut English into somewhat fewer tokens.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from transformers import AutoTokenizer

from read_cache.backbone.load import ModelDims
from read_cache.build.identity import dims_geometry
from read_cache.config import BuildConfig
from read_cache.store.formats import STORE_DTYPES
from read_cache.tasks.data import load_glue
from read_cache.tasks.specs import get_task

MODELS = {  # public configs: layers, hidden size, attention heads
    "Qwen2-0.5B": ModelDims(24, 0, 896, 14),
    "Llama-3.2-1B": ModelDims(16, 0, 2048, 32),
    "Llama-3.1-8B": ModelDims(32, 0, 4096, 32),
}
ROWS = {"sst2": 67_349 + 872, "qqp": 363_846 + 40_430}
"""Examples in all three splits after the split recipe (1k of train held out as validation, the dev set as test)."""


def mean_tokens(tokenizer, task: str, glue: Path, samples: int = 5000) -> float:
    spec = get_task(task)
    if task == "sst2":
        texts = [t for split in load_glue(spec, glue).values() for t in split.texts]
    else:
        with (glue / "QNLI" / "dev.tsv").open(newline="") as f:
            questions = [row["question"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row.get("question")]
        rng = random.Random(0)
        texts = [(rng.choice(questions), rng.choice(questions)) for _ in range(samples)]
    prompts = [spec.fill(spec.lm_template(), t) for t in texts]
    return sum(len(ids) for ids in tokenizer(prompts)["input_ids"]) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--glue", type=Path, required=True)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    print("| model | task | tokens/example | cached | " + " | ".join(f"{f} GB" for f in STORE_DTYPES) + " |")
    print("|---|---|---|---|" + "---|" * len(STORE_DTYPES))
    for task, examples in ROWS.items():
        mean = mean_tokens(tok, task, args.glue)
        for name, dims in MODELS.items():
            for cached, tokens in (("every token", int(mean * examples)), ("last token", examples)):
                cfg = BuildConfig(model=name, task=task)
                sizes = [dims_geometry(dims, "decoder", cfg, False, fmt).projected_disk_bytes(tokens, examples) / 1e9 for fmt in STORE_DTYPES]
                print(f"| {name} | {task} | {mean:.1f} | {cached} | " + " | ".join(f"{s:,.2f}" for s in sizes) + " |")


if __name__ == "__main__":
    main()
