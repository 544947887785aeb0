"""GLUE with the READ paper's train/validation/test recipe (DESIGN.md section 3).

    >>> from pathlib import Path
    >>> from read_cache.tasks.data import load_glue
    >>> from read_cache.tasks.specs import get_task
    >>> splits = load_glue(get_task("sst2"), data_dir=Path("../shared/glue"))
    >>> {name: len(split) for name, split in splits.items()}
    {'train': 66349, 'validation': 1000, 'test': 872}

GLUE's test labels are hidden, so the paper carves its own test set out of the labelled data:

* train < 10,000 examples: shuffle the original validation split (`RandomState(42).permutation`)
  and halve it, first half validation, second half test; train is the original train.
* otherwise: the first 1,000 indices of `RandomState(42).permutation(len(train))` become
  validation, the rest of train (in its original order) is train, the original validation is test.
* MNLI: validation_mismatched is validation, validation_matched is test.

That is `protocol="t5"` (the default). `protocol="lst"` reproduces Ladder Side-Tuning's
`seq2seq/data/tasks.py`, which the READ paper's code follows: the permutation is
`torch.randperm(n, generator=torch.Generator().manual_seed(42))`, tasks are sorted by name rather than
size (CoLA, MRPC, STS-B, RTE, WNLI halve the permuted validation split; SST-2, QNLI, QQP take the first
1,000 of the permuted train as validation and the rest, still in permuted order, as train), MNLI as above.

Sources, all mapped onto the hub's column names (`TaskSpec.text_fields` plus an integer or float
label) so nothing downstream knows where the data came from:

* the hub: `datasets.load_dataset("nyu-mll/glue", task.hub_config)`;
* a folder in the original GLUE TSV layout (`DIR/SST-2/train.tsv`, `dev.tsv`; MNLI
  `dev_matched.tsv`, `dev_mismatched.tsv`), or that task folder itself;
* a folder in the hub's parquet layout (`DIR/sst2/train-*.parquet`, `validation-*.parquet`), or
  that config folder itself.

Only the splits the recipe needs are read; GLUE's test files are never opened.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from read_cache.errors import ReadCacheError
from read_cache.kinds import PROTOCOLS
from read_cache.tasks.specs import TaskSpec

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
SMALL_TRAIN = 10_000
"""Below this many training examples the original validation split is halved into validation/test."""
HELD_OUT = 1_000
"""Training examples held out as validation when train is large."""
SEED = 42
"""Seed of the permutation behind every split (`np.random.RandomState` for t5, `torch.Generator` for lst)."""
LST_SMALL = ("cola", "mrpc", "stsb", "rte", "wnli")
"""LST's `small_datasets_without_all_splits` among GLUE: the permuted validation split is halved."""
LST_LARGE = ("sst2", "qnli", "qqp")
"""LST's `large_data_without_all_splits` among GLUE: 1,000 of the permuted train become validation."""
STSB_RANGE = (0.0, 5.0)
"""STS-B similarity scores lie in this closed range."""


@dataclass
class SplitData:
    """One split after the recipe, in the hub's schema."""

    texts: list[tuple[str, ...]]
    """Per example, the task's text fields in `TaskSpec.text_fields` order."""

    labels: np.ndarray
    """int64 class ids (the hub's ids) for classification, float32 scores for STS-B. [n]"""

    index: np.ndarray
    """int64 row of each example in its original split (`source`), for tracing back. [n]"""

    source: str
    """The original split the examples came from: "train", "validation", "validation_matched"..."""

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: np.ndarray) -> SplitData:
        """The examples at `rows` (positions in this split), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return SplitData(
            texts=[self.texts[i] for i in rows],
            labels=self.labels[rows],
            index=self.index[rows],
            source=self.source,
        )


# ---------------------------------------------------------------------------------------------
# The recipe


def needed_splits(task: TaskSpec) -> tuple[str, ...]:
    """The original (hub-named) splits the recipe reads; never GLUE's label-less test split."""
    if task.hub_config == "mnli":
        return ("train", "validation_matched", "validation_mismatched")
    return ("train", "validation")


def split_recipe(task: TaskSpec, train_size: int | None = None, protocol: str = "t5") -> str:
    """One sentence describing how `load_glue` made train/validation/test, for the cache's record.

    With `train_size` (the original train's length) it names the branch taken; without, the rule.
    """
    if protocol == "lst" and task.hub_config != "mnli":
        return _lst_recipe(task)
    if task.hub_config == "mnli":
        return (
            "mnli: train = original train, validation = original validation_mismatched, "
            "test = original validation_matched (GLUE test labels are hidden)."
        )
    halve = (
        f"the original validation split shuffled with np.random.RandomState({SEED}).permutation "
        "and halved (first len//2 validation, rest test), train = original train"
    )
    hold_out = (
        f"validation = the first {HELD_OUT:,} of np.random.RandomState({SEED}).permutation(len(train)), "
        "train = the rest of train in original order, test = original validation"
    )
    if train_size is None:
        return f"{task.name}: if train has < {SMALL_TRAIN:,} examples, {halve}; otherwise {hold_out}."
    branch = halve if train_size < SMALL_TRAIN else hold_out
    return f"{task.name} (original train {train_size:,} examples): {branch}."


def _lst_recipe(task: TaskSpec) -> str:
    perm = f"torch.randperm(n, generator=torch.Generator().manual_seed({SEED}))"
    if task.name in LST_LARGE:
        return (
            f"{task.name} (Ladder Side-Tuning's protocol): validation = the first {HELD_OUT:,} of {perm} over train, "
            "train = the rest of train in that permuted order, test = original validation."
        )
    return (
        f"{task.name} (Ladder Side-Tuning's protocol): the original validation split permuted by {perm} and halved "
        "(first n//2 validation, rest test), train = original train."
    )


def lst_permutation(n: int) -> np.ndarray:
    """Ladder Side-Tuning's `shuffled_indices`: torch.randperm(n) under a fresh generator seeded 42."""
    import torch  # only the lst protocol needs it; torch is a dependency of every stage anyway

    generator = torch.Generator()
    generator.manual_seed(SEED)
    return torch.randperm(n, generator=generator).numpy().astype(np.int64)


def lst_split_indices(task: TaskSpec, train_size: int, validation_size: int) -> dict[str, tuple[str, np.ndarray]]:
    """Per split of the lst protocol: (original split, rows taken from it, in order)."""
    if task.name in LST_LARGE:
        perm = lst_permutation(train_size)
        return {
            "train": ("train", perm[HELD_OUT:]),
            "validation": ("train", perm[:HELD_OUT]),
            "test": ("validation", np.arange(validation_size, dtype=np.int64)),
        }
    if task.name in LST_SMALL:
        perm = lst_permutation(validation_size)
        half = validation_size // 2
        return {
            "train": ("train", np.arange(train_size, dtype=np.int64)),
            "validation": ("validation", perm[:half]),
            "test": ("validation", perm[half:]),
        }
    raise ReadCacheError(f"the lst protocol has no split rule for {task.name}; use --protocol t5")


def apply_recipe(task: TaskSpec, originals: Mapping[str, SplitData], protocol: str = "t5") -> dict[str, SplitData]:
    """Turn the original labelled splits (keys from `needed_splits`) into train/validation/test."""
    if protocol not in PROTOCOLS:
        raise ReadCacheError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "lst" and task.hub_config != "mnli":
        rows = lst_split_indices(task, len(originals["train"]), len(originals["validation"]))
        splits = {name: originals[source].take(index) for name, (source, index) in rows.items()}
    elif task.hub_config == "mnli":
        splits = {
            "train": originals["train"],
            "validation": originals["validation_mismatched"],
            "test": originals["validation_matched"],
        }
    elif len(originals["train"]) < SMALL_TRAIN:
        dev = originals["validation"]
        perm = np.random.RandomState(SEED).permutation(len(dev))
        half = len(dev) // 2
        splits = {"train": originals["train"], "validation": dev.take(perm[:half]), "test": dev.take(perm[half:])}
    else:
        train = originals["train"]
        perm = np.random.RandomState(SEED).permutation(len(train))
        splits = {
            "train": train.take(np.sort(perm[HELD_OUT:])),
            "validation": train.take(perm[:HELD_OUT]),
            "test": originals["validation"],
        }
    for name, split in splits.items():
        if len(split) == 0:
            raise ReadCacheError(
                f"the split recipe left {task.name}'s {name} split empty (original sizes: "
                f"{', '.join(f'{k} {len(v)}' for k, v in originals.items())}); supply more labelled examples"
            )
    return splits


def load_glue(
    task: TaskSpec, data_dir: Path | None = None, limit: int | None = None, protocol: str = "t5"
) -> dict[str, SplitData]:
    """Load `task` from the hub (`data_dir=None`) or a local folder, apply the `protocol`'s recipe.

    Returns exactly the keys "train", "validation", "test"; `limit` keeps the first `limit`
    examples of each split after the recipe (for quick runs).
    """
    if limit is not None and limit <= 0:
        raise ReadCacheError(
            f"--limit must be a positive number of examples per split, got {limit}; "
            "pass --limit N with N >= 1 or leave --limit out"
        )
    splits = needed_splits(task)
    originals = _load_from_hub(task, splits) if data_dir is None else _load_local(task, Path(data_dir), splits)
    result = apply_recipe(task, originals, protocol)
    if limit is not None:
        result = {name: split.take(np.arange(min(limit, len(split)))) for name, split in result.items()}
    logger.info("%s: %s", task.name, ", ".join(f"{k} {len(v):,}" for k, v in result.items()))
    return result


# ---------------------------------------------------------------------------------------------
# Turning columns into a SplitData, with the label checks shared by every source


class _Origin(NamedTuple):
    """Where rows came from, to name a bad row in an error message."""

    name: str
    """A file path or a hub split, e.g. "nyu-mll/glue sst2 train"."""
    first_line: int | None = None
    """File line number of row 0 (TSV), or None to report 0-based rows (parquet, hub)."""

    def where(self, row: int) -> str:
        return f"{self.name} row {row}" if self.first_line is None else f"{self.name} line {row + self.first_line}"


def _make_split(
    task: TaskSpec, text_columns: Sequence[Sequence[str]], raw_labels: Any, split: str, origin: _Origin
) -> SplitData:
    """Build one original split; `text_columns` are in `task.text_fields` order."""
    n = len(raw_labels)
    if n == 0:
        raise ReadCacheError(f"{origin.name} has no examples; {task.name} needs a non-empty {split} split")
    labels = _parse_scores(raw_labels, origin) if task.is_regression else _parse_classes(task, raw_labels, origin)
    return SplitData(
        texts=list(zip(*text_columns)), labels=labels, index=np.arange(n, dtype=np.int64), source=split
    )


def _parse_scores(raw: Any, origin: _Origin) -> np.ndarray:
    """STS-B scores as float32 in [0, 5]; a shifted column (stray tab) shows up here as text."""
    values: list[float] = []
    for row, value in enumerate(raw):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not np.isfinite(number):
            raise ReadCacheError(
                f"{origin.where(row)}: STS-B score {value!r} is not a number; "
                "fix that row (a stray tab shifts its columns) or use a clean copy of STS-B"
            )
        values.append(number)
    scores = np.asarray(values, dtype=np.float32)
    bad = np.flatnonzero((scores < STSB_RANGE[0]) | (scores > STSB_RANGE[1]))
    if bad.size:
        raise ReadCacheError(
            f"{origin.where(int(bad[0]))}: STS-B score {float(scores[bad[0]])} is outside 0-5; "
            "fix that row or use a clean copy of STS-B"
        )
    return scores


def _parse_classes(task: TaskSpec, raw: Any, origin: _Origin) -> np.ndarray:
    """Class ids as int64; accepts ids ("1", 1) or the task's label words ("entailment")."""
    lookup = {word: i for i, word in enumerate(task.label_words)}
    lookup.update({str(i): i for i in range(task.num_labels)})
    ids = np.empty(len(raw), dtype=np.int64)
    for row, value in enumerate(raw):
        key = _label_key(value)
        if key not in lookup:
            choices = ", ".join(f"{i}/{w}" for i, w in enumerate(task.label_words))
            raise ReadCacheError(
                f"{origin.where(row)}: label {value!r} is outside {task.name}'s labels ({choices}); "
                "use the labelled train/validation files (GLUE's test labels are hidden, -1 on the hub)"
            )
        ids[row] = lookup[key]
    return ids


def _label_key(value: Any) -> str:
    """Normalise a raw label to a lookup key: ids from parquet may be ints or whole floats."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value).strip()


# ---------------------------------------------------------------------------------------------
# The hub


def _load_from_hub(task: TaskSpec, splits: Sequence[str]) -> dict[str, SplitData]:
    """Read `splits` of `nyu-mll/glue` through `datasets` (or its local cache)."""
    import datasets  # imported here: it is slow to import and only the hub path needs it

    try:
        dataset_dict = datasets.load_dataset(HUB_DATASET, task.hub_config)
    except Exception as exc:  # any failure (offline, DNS, auth, missing config) means the same to a user
        logger.debug("loading %s/%s from the hub failed", HUB_DATASET, task.hub_config, exc_info=True)
        raise ReadCacheError(
            f"could not load {HUB_DATASET} ({task.hub_config}) from the Hugging Face hub "
            f"({type(exc).__name__}); pass --data-dir FOLDER holding GLUE TSV files "
            f"(e.g. {_tsv_folder(task)}/train.tsv) or the hub's parquet files ({task.hub_config}/train-*.parquet)"
        ) from exc
    columns = [*task.text_fields, "label"]
    result = {}
    for split in splits:
        where = f"{HUB_DATASET} {task.hub_config} {split}"
        if split not in dataset_dict:
            raise ReadCacheError(f"{where} is missing from the downloaded dataset; pass --data-dir with GLUE files")
        dataset = dataset_dict[split]
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise ReadCacheError(f"{where} has no column {missing[0]!r}; pass --data-dir with GLUE files")
        data = dataset.select_columns(columns).to_dict()
        text_columns = [data[f] for f in task.text_fields]
        result[split] = _make_split(task, text_columns, data["label"], split, _Origin(where))
    return result


# ---------------------------------------------------------------------------------------------
# Local folders: GLUE TSV layout or the hub's parquet layout


@dataclass(frozen=True)
class _TsvFormat:
    """How one task's files look in the original GLUE distribution."""

    folder: str
    """Task folder written by the GLUE download script, e.g. "SST-2"."""
    text_columns: tuple[str, ...]
    """TSV column names matching `TaskSpec.text_fields`, in the same order."""
    label_column: str
    """TSV column holding the label (an id, a label word, or the STS-B score)."""
    header: tuple[str, ...] | None = None
    """Column names for header-less files (CoLA); None means the first line is the header."""


_TSV_FORMATS: dict[str, _TsvFormat] = {
    "cola": _TsvFormat("CoLA", ("sentence",), "label", header=("source", "label", "original_label", "sentence")),
    "sst2": _TsvFormat("SST-2", ("sentence",), "label"),
    "mrpc": _TsvFormat("MRPC", ("#1 String", "#2 String"), "Quality"),
    "qqp": _TsvFormat("QQP", ("question1", "question2"), "is_duplicate"),
    "stsb": _TsvFormat("STS-B", ("sentence1", "sentence2"), "score"),
    # text_fields are (hypothesis, premise); GLUE's MNLI calls them sentence2 and sentence1.
    "mnli": _TsvFormat("MNLI", ("sentence2", "sentence1"), "gold_label"),
    "qnli": _TsvFormat("QNLI", ("question", "sentence"), "label"),
    "rte": _TsvFormat("RTE", ("sentence1", "sentence2"), "label"),
    "wnli": _TsvFormat("WNLI", ("sentence1", "sentence2"), "label"),
}

_TSV_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


def _tsv_folder(task: TaskSpec) -> str:
    return _TSV_FORMATS[task.name].folder


def _load_local(task: TaskSpec, data_dir: Path, splits: Sequence[str]) -> dict[str, SplitData]:
    """Read `splits` from a GLUE TSV or hub-parquet folder, whichever `data_dir` holds."""
    data_dir = data_dir.expanduser()
    if not data_dir.exists():
        raise ReadCacheError(f"--data-dir {data_dir} does not exist; point --data-dir at a folder of GLUE files")
    if not data_dir.is_dir():
        raise ReadCacheError(f"--data-dir {data_dir} is not a folder; point --data-dir at a folder of GLUE files")
    folder, layout = _find_layout(task, data_dir)
    logger.info("%s: reading %s files from %s", task.name, layout, folder)
    reader = _read_tsv_split if layout == "tsv" else _read_parquet_split
    return {split: reader(task, folder, split) for split in splits}


def _find_layout(task: TaskSpec, data_dir: Path) -> tuple[Path, str]:
    """The folder holding this task's files and its layout ("tsv" or "parquet")."""
    tsv_folder, config = _tsv_folder(task), task.hub_config
    for folder, layout in ((data_dir / tsv_folder, "tsv"), (data_dir / config, "parquet")):
        if _has_train(folder, layout):
            return folder, layout
    for layout in ("tsv", "parquet"):
        if _has_train(data_dir, layout):
            _check_not_other_task(task, data_dir)
            return data_dir, layout
    raise ReadCacheError(
        f"--data-dir {data_dir} has no {tsv_folder} train file ({tsv_folder}/train.tsv or "
        f"{config}/train-*.parquet); point --data-dir at a folder in the GLUE TSV layout or the hub's parquet layout"
    )


def _has_train(folder: Path, layout: str) -> bool:
    if layout == "tsv":
        return (folder / _TSV_FILES["train"]).is_file()
    return any(folder.glob("train-*.parquet"))


def _check_not_other_task(task: TaskSpec, folder: Path) -> None:
    """Refuse e.g. --data-dir glue/RTE for wnli: same columns, so nothing else would notice."""
    name = folder.name.lower().replace("-", "")
    for other, fmt in _TSV_FORMATS.items():
        if other != task.name and name in (other, fmt.folder.lower().replace("-", "")):
            raise ReadCacheError(
                f"--data-dir {folder} looks like the {fmt.folder} folder but the task is {task.name}; "
                f"pass the GLUE root folder or the {_tsv_folder(task)} folder"
            )


def _read_tsv_split(task: TaskSpec, folder: Path, split: str) -> SplitData:
    """One original split from a GLUE TSV file, columns taken by header name."""
    fmt = _TSV_FORMATS[task.name]
    path = folder / _TSV_FILES[split]
    if not path.is_file():
        raise ReadCacheError(
            f"--data-dir {folder} has no {fmt.folder} {split} file ({path.name}); "
            "add it from the GLUE download or point --data-dir at a complete copy"
        )
    header = fmt.header or _read_header(path)
    wanted = [*fmt.text_columns, fmt.label_column]
    _require_columns(path, header, wanted)
    table = _read_tsv_table(path, header, wanted, skip_header=fmt.header is None)
    text_columns = [table.column(c).to_pylist() for c in fmt.text_columns]
    labels = table.column(fmt.label_column).to_pylist()
    origin = _Origin(str(path), first_line=1 if fmt.header else 2)
    return _make_split(task, text_columns, labels, split, origin)


def _read_header(path: Path) -> tuple[str, ...]:
    """The first line's column names; utf-8-sig drops the BOM MRPC's header starts with."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            line = f.readline()
    except UnicodeDecodeError as exc:
        raise ReadCacheError(f"{path} is not UTF-8 text; use the files from the GLUE download") from exc
    return tuple(line.rstrip("\r\n").split("\t"))


def _require_columns(path: Path, columns: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ReadCacheError(
            f"{path} has no column {missing[0]!r} (its columns: {', '.join(columns)}); "
            "use the file from the GLUE download, which has that column"
        )


def _read_tsv_table(path: Path, header: Sequence[str], wanted: Sequence[str], *, skip_header: bool) -> pa.Table:
    """Parse with quoting off: GLUE texts contain bare `"` (MRPC, STS-B) that are not CSV quotes."""
    try:
        return pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(column_names=list(header), skip_rows=1 if skip_header else 0),
            parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pa_csv.ConvertOptions(
                include_columns=list(wanted), column_types={c: pa.string() for c in wanted}
            ),
        )
    except pa.ArrowInvalid as exc:
        detail = str(exc).splitlines()[0][:200]
        raise ReadCacheError(
            f"{path} is not a well-formed GLUE TSV file ({detail}); use the file from the GLUE download"
        ) from exc


def _read_parquet_split(task: TaskSpec, folder: Path, split: str) -> SplitData:
    """One original split from the hub's parquet shards (`split-0000x-of-0000n.parquet`)."""
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if not files:
        raise ReadCacheError(
            f"--data-dir {folder} has no {task.hub_config} {split} file ({split}-*.parquet); "
            "add it from the hub's nyu-mll/glue parquet files or point --data-dir at a complete copy"
        )
    wanted = [*task.text_fields, "label"]
    for path in files:
        _require_columns(path, pq.read_schema(path).names, wanted)
    table = pa.concat_tables([pq.read_table(path, columns=wanted) for path in files])
    for column in task.text_fields:
        if table.column(column).null_count:
            raise ReadCacheError(f"{folder}/{split}-*.parquet has missing {column!r} texts; use the hub's files")
    text_columns = [table.column(c).to_pylist() for c in task.text_fields]
    labels = table.column("label").to_pylist()
    return _make_split(task, text_columns, labels, split, _Origin(f"{folder}/{split}-*.parquet"))
