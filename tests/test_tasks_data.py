"""Tasks, GLUE loading with the paper's split recipe, and metrics: offline, in seconds.

    pytest tests/test_tasks_data.py -q

Tiny GLUE folders (TSV and parquet) are written into tmp_path; the tests on real GLUE files use
../shared/glue beside the repository and are skipped where it is absent.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from read_cache.errors import ReadCacheError
from read_cache.tasks.data import (
    SplitData,
    apply_recipe,
    load_glue,
    needed_splits,
    split_recipe,
)
from read_cache.tasks.metrics import majority_baseline, score
from read_cache.tasks.specs import TASKS, Metric, get_task

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"


def needs_shared(test):  # noqa: ANN001, ANN201 - a pytest decorator
    """Real GLUE files: CI's checkout has ../shared beside the repo, a user's clone does not."""
    skip = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/glue is absent")
    return pytest.mark.shared(skip(test))


# ---------------------------------------------------------------------------------------------
# Helpers: tiny GLUE folders


def write_tsv(path: Path, header: list[str] | None, rows: list[list[object]], *, bom: bool = False) -> Path:
    """A GLUE-style TSV: tab-separated, no quoting, optional header (MRPC's starts with a BOM)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def sst2_folder(root: Path, n_train: int, n_dev: int) -> Path:
    """GLUE's SST-2 layout; sentence i of train is "train i", labels alternate 0/1."""
    write_tsv(root / "SST-2" / "train.tsv", ["sentence", "label"], [[f"train {i} ", i % 2] for i in range(n_train)])
    write_tsv(root / "SST-2" / "dev.tsv", ["sentence", "label"], [[f"dev {i} ", (i + 1) % 2] for i in range(n_dev)])
    return root


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def rte_rows(n: int, prefix: str) -> list[list[object]]:
    words = ("entailment", "not_entailment")
    return [[i, f"{prefix} a{i}", f"{prefix} b{i}", words[i % 2]] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# tasks.py

DESIGN_TABLE = {
    "cola": ("cola sentence: {sentence}", ("unacceptable", "acceptable"), Metric.MATTHEWS),
    "sst2": ("sst2 sentence: {sentence}", ("negative", "positive"), Metric.ACCURACY),
    "mrpc": ("mrpc sentence1: {sentence1} sentence2: {sentence2}", ("not_equivalent", "equivalent"), Metric.F1_ACCURACY),
    "qqp": ("qqp question1: {question1} question2: {question2}", ("not_duplicate", "duplicate"), Metric.F1_ACCURACY),
    "stsb": ("stsb sentence1: {sentence1} sentence2: {sentence2}", (), Metric.PEARSON_SPEARMAN),
    "mnli": ("mnli hypothesis: {hypothesis} premise: {premise}", ("entailment", "neutral", "contradiction"), Metric.ACCURACY),
    "qnli": ("qnli question: {question} sentence: {sentence}", ("entailment", "not_entailment"), Metric.ACCURACY),
    "rte": ("rte sentence1: {sentence1} sentence2: {sentence2}", ("entailment", "not_entailment"), Metric.ACCURACY),
    "wnli": ("wnli sentence1: {sentence1} sentence2: {sentence2}", ("not_entailment", "entailment"), Metric.ACCURACY),
}


@pytest.mark.parametrize("name", list(DESIGN_TABLE))
def test_task_matches_design_table(name: str) -> None:
    template, words, metric = DESIGN_TABLE[name]
    task = TASKS[name]
    assert (task.name, task.hub_config) == (name, name)
    assert (task.t5_template, task.label_words, task.metric) == (template, words, metric)
    # Every text field has exactly one placeholder, in text_fields order.
    positions = [template.index("{" + f + "}") for f in task.text_fields]
    assert positions == sorted(positions) and template.count("{") == len(task.text_fields)


def test_task_properties_and_t5_input() -> None:
    assert list(TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    mnli, stsb = get_task("mnli"), get_task("stsb")
    assert mnli.text_fields == ("hypothesis", "premise")
    assert (mnli.is_regression, mnli.num_labels) == (False, 3)
    assert (stsb.is_regression, stsb.num_labels) == (True, 1)
    expected = "mnli hypothesis: A cat sleeps. premise: The {cat} naps."
    assert mnli.t5_input({"premise": "The {cat} naps.", "hypothesis": "A cat sleeps.", "idx": 3}) == expected
    assert mnli.t5_input(("A cat sleeps.", "The {cat} naps.")) == expected
    assert get_task("sst2").t5_input(("fine .",)) == "sst2 sentence: fine ."
    with pytest.raises(ValueError):
        mnli.t5_input(("only one",))
    with pytest.raises(ValueError):
        mnli.t5_input({"premise": "p"})
    with pytest.raises(AttributeError):
        mnli.name = "x"  # type: ignore[misc]  # frozen


def test_get_task() -> None:
    assert get_task("SST-2") is TASKS["sst2"] and get_task(" STS-B ") is TASKS["stsb"]
    with pytest.raises(ReadCacheError, match=r"unknown task 'glue9'; choose one of cola, sst2, mrpc, .*wnli"):
        get_task("glue9")


# ---------------------------------------------------------------------------------------------
# The split recipe


def test_small_train_halves_shuffled_validation(tmp_path: Path) -> None:
    splits = load_glue(get_task("sst2"), sst2_folder(tmp_path, n_train=30, n_dev=11))
    assert list(splits) == ["train", "validation", "test"]
    assert [len(s) for s in splits.values()] == [30, 5, 6]
    perm = np.random.RandomState(42).permutation(11)
    assert splits["validation"].index.tolist() == perm[:5].tolist()
    assert splits["test"].index.tolist() == perm[5:].tolist()
    assert {s.source for s in (splits["validation"], splits["test"])} == {"validation"}
    assert splits["train"].index.tolist() == list(range(30)) and splits["train"].source == "train"
    # Texts and labels travel with their index.
    val = splits["validation"]
    assert val.texts[0] == (f"dev {perm[0]} ",) and val.labels[0] == (perm[0] + 1) % 2
    assert val.labels.dtype == np.int64 and val.index.dtype == np.int64
    again = load_glue(get_task("sst2"), tmp_path)
    assert all(again[k].texts == splits[k].texts for k in splits)


def test_large_train_holds_out_1000(tmp_path: Path) -> None:
    splits = load_glue(get_task("sst2"), sst2_folder(tmp_path, n_train=10_000, n_dev=7))
    assert [len(s) for s in splits.values()] == [9_000, 1_000, 7]
    perm = np.random.RandomState(42).permutation(10_000)
    assert splits["validation"].index.tolist() == perm[:1000].tolist()
    assert splits["validation"].source == "train"
    train_index = splits["train"].index
    assert np.all(np.diff(train_index) > 0), "train keeps its original order"
    assert sorted([*train_index, *splits["validation"].index]) == list(range(10_000))
    assert splits["train"].texts[0] == (f"train {train_index[0]} ",)
    assert splits["test"].index.tolist() == list(range(7)) and splits["test"].source == "validation"
    assert "1,000" in split_recipe(get_task("sst2"), 10_000) and "halved" in split_recipe(get_task("sst2"), 9_999)
    assert "10,000" in split_recipe(get_task("sst2"))


def test_mnli_uses_mismatched_for_validation(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "label1", "gold_label"]
    words = ("entailment", "neutral", "contradiction")
    for name, n in (("train", 6), ("dev_matched", 4), ("dev_mismatched", 3)):
        rows = [[i, f"{name} premise {i}", f"{name} hyp {i}", "x", words[i % 3]] for i in range(n)]
        write_tsv(tmp_path / "MNLI" / f"{name}.tsv", header, rows)
    splits = load_glue(get_task("mnli"), tmp_path)
    assert [len(s) for s in splits.values()] == [6, 3, 4]
    assert splits["validation"].source == "validation_mismatched" and splits["test"].source == "validation_matched"
    assert splits["train"].texts[1] == ("train hyp 1", "train premise 1")  # (hypothesis, premise)
    assert splits["train"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert needed_splits(get_task("mnli")) == ("train", "validation_matched", "validation_mismatched")
    assert "validation_mismatched" in split_recipe(get_task("mnli"))


def test_limit_caps_each_split_after_recipe(tmp_path: Path) -> None:
    full = load_glue(get_task("sst2"), sst2_folder(tmp_path, 30, 11))
    capped = load_glue(get_task("sst2"), tmp_path, limit=4)
    assert [len(s) for s in capped.values()] == [4, 4, 4]
    assert all(capped[k].index.tolist() == full[k].index[:4].tolist() for k in full)
    assert len(load_glue(get_task("sst2"), tmp_path, limit=100)["validation"]) == 5
    for bad in (0, -3):
        with pytest.raises(ReadCacheError, match="--limit"):
            load_glue(get_task("sst2"), tmp_path, limit=bad)


def test_recipe_that_empties_a_split_is_refused() -> None:
    task = get_task("rte")
    one = SplitData(texts=[("a", "b")], labels=np.zeros(1, np.int64), index=np.zeros(1, np.int64), source="validation")
    with pytest.raises(ReadCacheError, match="validation split empty"):
        apply_recipe(task, {"train": one, "validation": one})


# ---------------------------------------------------------------------------------------------
# TSV formats of each task


def test_tsv_formats_of_every_task(tmp_path: Path) -> None:
    write_tsv(tmp_path / "CoLA" / "train.tsv", None, [["gj04", 1, "", "Good one."], ["gj04", 0, "*", "Bad one."]])
    write_tsv(tmp_path / "CoLA" / "dev.tsv", None, [["gj04", 0, "*", "x"], ["gj04", 1, "", "y"]])
    mrpc_header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    for name in ("train", "dev"):
        rows = [[1, 7, 8, 'He said "hi', 'She "said" hi.'], [0, 9, 10, "x", "y"]]
        write_tsv(tmp_path / "MRPC" / f"{name}.tsv", mrpc_header, rows, bom=True)
    qqp_rows = [[i, 1, 2, f"q1 {i}?", f'"q2 {i}?', i % 2] for i in range(4)]
    for name in ("train", "dev"):
        qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        write_tsv(tmp_path / "QQP" / f"{name}.tsv", qqp_header, qqp_rows)
        write_tsv(tmp_path / "QNLI" / f"{name}.tsv", ["index", "question", "sentence", "label"], rte_rows(4, "q"))
        write_tsv(tmp_path / "RTE" / f"{name}.tsv", ["index", "sentence1", "sentence2", "label"], rte_rows(4, "r"))
        wnli_rows = [[0, "a", "b", 1], [1, "c", "d", 0]]
        write_tsv(tmp_path / "WNLI" / f"{name}.tsv", ["index", "sentence1", "sentence2", "label"], wnli_rows)
    stsb_header = ["index", "genre", "sentence1", "sentence2", "score"]
    for name in ("train", "dev"):
        stsb_rows = [[0, "g", '"Quoted', 'end"', "4.750"], [1, "g", "a", "b", "0"]]
        write_tsv(tmp_path / "STS-B" / f"{name}.tsv", stsb_header, stsb_rows)

    cola = load_glue(get_task("cola"), tmp_path)["train"]
    assert cola.texts == [("Good one.",), ("Bad one.",)] and cola.labels.tolist() == [1, 0]
    mrpc = load_glue(get_task("mrpc"), tmp_path)["train"]
    assert mrpc.texts[0] == ('He said "hi', 'She "said" hi.') and mrpc.labels.tolist() == [1, 0]
    qqp = load_glue(get_task("qqp"), tmp_path)["train"]
    assert qqp.texts[1] == ("q1 1?", '"q2 1?') and qqp.labels.tolist() == [0, 1, 0, 1]
    qnli = load_glue(get_task("qnli"), tmp_path)["train"]
    assert qnli.texts[0] == ("q a0", "q b0") and qnli.labels.tolist() == [0, 1, 0, 1]
    assert load_glue(get_task("rte"), tmp_path)["train"].labels.tolist() == [0, 1, 0, 1]
    assert load_glue(get_task("wnli"), tmp_path)["train"].labels.tolist() == [1, 0]
    stsb = load_glue(get_task("stsb"), tmp_path)["train"]
    assert stsb.texts[0] == ('"Quoted', 'end"') and stsb.labels.dtype == np.float32
    assert stsb.labels.tolist() == [4.75, 0.0]


def test_data_dir_may_be_the_task_folder(tmp_path: Path) -> None:
    sst2_folder(tmp_path, 30, 11)
    direct = load_glue(get_task("sst2"), tmp_path / "SST-2")
    assert [len(s) for s in direct.values()] == [30, 5, 6]


# ---------------------------------------------------------------------------------------------
# Parquet layout


def test_parquet_layout_sharded_and_direct(tmp_path: Path) -> None:
    folder = tmp_path / "stsb"

    def stsb(first: str, second: str, scores: list[float]) -> dict[str, object]:
        return {"sentence1": list(first), "sentence2": list(second), "label": pa.array(scores, pa.float32())}

    write_parquet(folder / "train-00000-of-00002.parquet", {**stsb("ab", "cd", [1.0, 2.5]), "idx": [0, 1]})
    write_parquet(folder / "train-00001-of-00002.parquet", {**stsb("e", "f", [5.0]), "idx": [2]})
    write_parquet(folder / "validation-00000-of-00001.parquet", stsb("ghij", "klmn", [0.0, 1.0, 2.0, 3.0]))
    write_parquet(folder / "test-00000-of-00001.parquet", stsb("z", "z", [-1.0]))  # hidden labels: never read
    for data_dir in (tmp_path, folder):
        splits = load_glue(get_task("stsb"), data_dir)
        assert [len(s) for s in splits.values()] == [3, 2, 2]
        assert splits["train"].texts == [("a", "c"), ("b", "d"), ("e", "f")]
        assert splits["train"].labels.tolist() == [1.0, 2.5, 5.0]


def test_parquet_mnli_split_names(tmp_path: Path) -> None:
    cols = {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0]}
    for split in ("train", "validation_matched", "validation_mismatched"):
        write_parquet(tmp_path / "mnli" / f"{split}-00000-of-00001.parquet", cols)
    splits = load_glue(get_task("mnli"), tmp_path)
    assert splits["validation"].source == "validation_mismatched"
    assert splits["train"].texts == [("h0", "p0"), ("h1", "p1")] and splits["train"].labels.tolist() == [2, 0]


def test_parquet_errors(tmp_path: Path) -> None:
    write_parquet(tmp_path / "sst2" / "train-00000-of-00001.parquet", {"sentence": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ReadCacheError, match=r"no sst2 validation file \(validation-\*\.parquet\)"):
        load_glue(get_task("sst2"), tmp_path)
    write_parquet(tmp_path / "sst2" / "validation-00000-of-00001.parquet", {"sentence": ["a", "b"], "label": [-1, -1]})
    with pytest.raises(ReadCacheError, match=r"validation-\*\.parquet row 0: label -1 is outside sst2's labels"):
        load_glue(get_task("sst2"), tmp_path)
    write_parquet(tmp_path / "sst2" / "validation-00000-of-00001.parquet", {"text": ["a"], "label": [0]})
    with pytest.raises(ReadCacheError, match=r"validation-00000-of-00001\.parquet has no column 'sentence'"):
        load_glue(get_task("sst2"), tmp_path)


# ---------------------------------------------------------------------------------------------
# Errors from local folders: one line each, naming the problem and the fix


def assert_one_line(exc: pytest.ExceptionInfo[ReadCacheError]) -> None:
    assert "\n" not in str(exc.value) and ";" in str(exc.value)


def test_missing_data_dir_and_files(tmp_path: Path) -> None:
    with pytest.raises(ReadCacheError, match="does not exist") as exc:
        load_glue(get_task("sst2"), tmp_path / "nope")
    assert_one_line(exc)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ReadCacheError, match="is not a folder"):
        load_glue(get_task("sst2"), tmp_path / "file.txt")
    with pytest.raises(ReadCacheError, match=r"has no SST-2 train file \(SST-2/train.tsv or sst2/train-\*.parquet\)") as exc:
        load_glue(get_task("sst2"), tmp_path)
    assert_one_line(exc)
    write_tsv(tmp_path / "MNLI" / "train.tsv", ["sentence1", "sentence2", "gold_label"], [["a", "b", "neutral"]])
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", ["sentence1", "sentence2", "gold_label"], [["a", "b", "neutral"]])
    with pytest.raises(ReadCacheError, match=r"no MNLI validation_matched file \(dev_matched.tsv\)") as exc:
        load_glue(get_task("mnli"), tmp_path)
    assert_one_line(exc)


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence_2", "label"], rte_rows(4, "r"))
    write_tsv(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], rte_rows(4, "r"))
    expected = r"RTE/train.tsv has no column 'sentence2' \(its columns: index, sentence1, sentence_2, label\)"
    with pytest.raises(ReadCacheError, match=expected) as exc:
        load_glue(get_task("rte"), tmp_path)
    assert_one_line(exc)


def test_empty_split(tmp_path: Path) -> None:
    sst2_folder(tmp_path, 30, 0)
    with pytest.raises(ReadCacheError, match=r"SST-2/dev.tsv has no examples") as exc:
        load_glue(get_task("sst2"), tmp_path)
    assert_one_line(exc)


def test_label_out_of_range_names_file_line_and_value(tmp_path: Path) -> None:
    sst2_folder(tmp_path, 30, 11)
    write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [["a", 0], ["b", 2]])
    expected = r"SST-2/dev.tsv line 3: label '2' is outside sst2's labels \(0/negative, 1/positive\)"
    with pytest.raises(ReadCacheError, match=expected) as exc:
        load_glue(get_task("sst2"), tmp_path)
    assert_one_line(exc)
    write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], [[0, "a", "b", "neutral"]])
    write_tsv(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], rte_rows(4, "r"))
    with pytest.raises(ReadCacheError, match=r"RTE/train.tsv line 2: label 'neutral'"):
        load_glue(get_task("rte"), tmp_path)


def test_stsb_scores_must_be_numbers_in_range(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "STS-B" / "dev.tsv", header, [[0, "a", "b", "1.0"], [1, "c", "d", "2"]])
    write_tsv(tmp_path / "STS-B" / "train.tsv", header, [[0, "a", "b", "1.0"], [1, "c", "d", "oops"]])
    with pytest.raises(ReadCacheError, match=r"STS-B/train.tsv line 3: STS-B score 'oops' is not a number") as exc:
        load_glue(get_task("stsb"), tmp_path)
    assert_one_line(exc)
    write_tsv(tmp_path / "STS-B" / "train.tsv", header, [[0, "a", "b", "5.5"]])
    with pytest.raises(ReadCacheError, match=r"line 2: STS-B score 5.5 is outside 0-5"):
        load_glue(get_task("stsb"), tmp_path)


def test_row_with_stray_tab_is_reported(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "STS-B" / "dev.tsv", header, [[0, "a", "b", "1.0"], [1, "c", "d", "2"]])
    write_tsv(tmp_path / "STS-B" / "train.tsv", header, [[0, "a", "b\tc", "1.0"]])
    expected = r"STS-B/train.tsv is not a well-formed GLUE TSV file \(.*Expected 4 columns, got 5"
    with pytest.raises(ReadCacheError, match=expected) as exc:
        load_glue(get_task("stsb"), tmp_path)
    assert_one_line(exc)


def test_folder_of_another_task_is_refused(tmp_path: Path) -> None:
    # RTE and WNLI share columns and label words, so only the folder name can tell them apart.
    write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], rte_rows(4, "r"))
    write_tsv(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], rte_rows(4, "r"))
    with pytest.raises(ReadCacheError, match=r"looks like the RTE folder but the task is wnli"):
        load_glue(get_task("wnli"), tmp_path / "RTE")
    with pytest.raises(ReadCacheError, match=r"has no WNLI train file"):
        load_glue(get_task("wnli"), tmp_path)


# ---------------------------------------------------------------------------------------------
# The hub path, with datasets.load_dataset patched (the hub is never contacted in tests)


def test_hub_failure_says_pass_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    expected = r"could not load nyu-mll/glue \(cola\) from the Hugging Face hub \(ConnectionError\); pass --data-dir FOLDER"
    with pytest.raises(ReadCacheError, match=expected) as exc:
        load_glue(get_task("cola"))
    assert_one_line(exc)


def test_hub_dataset_goes_through_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(path: str, name: str) -> datasets.DatasetDict:
        calls.append((path, name))
        def split(n: int) -> datasets.Dataset:
            rows = range(n)
            columns = {"sentence1": [f"a{i}" for i in rows], "sentence2": [f"b{i}" for i in rows]}
            return datasets.Dataset.from_dict({**columns, "label": [i % 2 for i in rows], "idx": list(rows)})

        return datasets.DatasetDict({"train": split(8), "validation": split(6), "test": split(3)})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    splits = load_glue(get_task("rte"))
    assert calls == [("nyu-mll/glue", "rte")]
    assert [len(s) for s in splits.values()] == [8, 3, 3]
    assert splits["train"].texts[2] == ("a2", "b2") and splits["train"].labels.tolist() == [0, 1] * 4


# ---------------------------------------------------------------------------------------------
# Real GLUE files from ../shared/glue


@needs_shared
def test_real_sst2() -> None:
    splits = load_glue(get_task("sst2"), SHARED_GLUE)
    assert [len(s) for s in splits.values()] == [66_349, 1_000, 872]
    train, test = splits["train"], splits["test"]
    assert train.texts[0] == ("hide new secretions from the parental units ",) and train.labels[0] == 0
    assert test.texts[0] == ("it 's a charming and often affecting journey . ",) and test.labels[0] == 1
    assert sorted([*train.index, *splits["validation"].index]) == list(range(67_349))
    assert set(np.unique(train.labels)) == {0, 1}


@needs_shared
def test_real_cola() -> None:
    splits = load_glue(get_task("cola"), SHARED_GLUE)
    assert [len(s) for s in splits.values()] == [8_551, 521, 522]
    train = splits["train"]
    assert train.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert train.labels[:3].tolist() == [1, 1, 1]
    both = sorted([*splits["validation"].index, *splits["test"].index])
    assert both == list(range(1_043))
    # dev.tsv line 1 (no header in CoLA) is row 0, wherever the shuffle put it.
    halves = (splits["validation"], splits["test"])
    dev = {int(i): (t, int(y)) for half in halves for i, t, y in zip(half.index, half.texts, half.labels)}
    assert dev[0] == (("The sailors rode the breeze clear of the rocks.",), 1)


@needs_shared
def test_real_mrpc() -> None:
    splits = load_glue(get_task("mrpc"), SHARED_GLUE)
    assert [len(s) for s in splits.values()] == [3_668, 204, 204]
    train = splits["train"]
    assert train.texts[0] == (
        'Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.',
        'Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting his evidence.',
    )
    assert train.labels[:2].tolist() == [1, 0]


@needs_shared
def test_real_stsb() -> None:
    splits = load_glue(get_task("stsb"), SHARED_GLUE)
    assert [len(s) for s in splits.values()] == [5_749, 750, 750]
    train = splits["train"]
    assert train.labels.dtype == np.float32 and train.labels[:2].tolist() == pytest.approx([5.0, 3.8])
    # Line 2003 opens a quote it never closes; with quoting on it would swallow the next rows.
    assert train.texts[2001] == ('"Then the captain was gone.', "Then the captain came back.")
    assert train.labels[2001] == pytest.approx(0.8)
    assert 0.0 <= train.labels.min() and train.labels.max() <= 5.0


@needs_shared
def test_real_qnli_without_train_is_a_clear_error() -> None:
    with pytest.raises(ReadCacheError, match=r"has no QNLI train file"):
        load_glue(get_task("qnli"), SHARED_GLUE)


# ---------------------------------------------------------------------------------------------
# metrics.py, against hand-computed values


def test_matthews() -> None:
    # TP=1, TN=2, FP=0, FN=1: (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3) = 2 / sqrt(12)
    result = score(get_task("cola"), np.array([1, 0, 0, 0]), np.array([1, 1, 0, 0]))
    assert result == {"metric": "matthews_corrcoef", "score": pytest.approx(2 / np.sqrt(12))}
    assert type(result["score"]) is float


def test_accuracy_and_f1() -> None:
    assert score(get_task("qnli"), np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == {"metric": "accuracy", "score": 0.75}
    # TP=2, FP=1, FN=0: F1 = 2*2 / (2*2 + 1 + 0) = 0.8, accuracy 3/4
    result = score(get_task("mrpc"), np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1]))
    expected = {"metric": "mean_f1_accuracy", "score": pytest.approx(0.775), "f1": pytest.approx(0.8), "accuracy": 0.75}
    assert result == expected
    assert all(type(result[k]) is float for k in ("score", "f1", "accuracy"))


def test_pearson_spearman() -> None:
    # Pearson: sum(dx*dy)=6.5, sum(dx^2)=5, sum(dy^2)=8.75; Spearman: same ranks -> 1
    result = score(get_task("stsb"), np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
    pearson = 6.5 / np.sqrt(5 * 8.75)
    assert result == {
        "metric": "mean_pearson_spearman",
        "score": pytest.approx((pearson + 1) / 2),
        "pearson": pytest.approx(pearson),
        "spearman": pytest.approx(1.0),
    }
    assert all(type(result[k]) is float for k in ("score", "pearson", "spearman"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = score(get_task("stsb"), np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 5.0]))
    assert (constant["score"], constant["pearson"], constant["spearman"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        score(get_task("stsb"), np.ones(3), np.ones(4))


def test_majority_baseline() -> None:
    sst2 = majority_baseline(get_task("sst2"), np.array([1, 1, 0]), np.array([1, 0, 0, 0]))
    assert (sst2["score"], sst2["prediction"], sst2["label"]) == (0.25, 1, "positive")
    mnli = majority_baseline(get_task("mnli"), np.array([2, 2, 1, 0]), np.array([2, 1, 2]))
    assert mnli["score"] == pytest.approx(2 / 3) and mnli["label"] == "contradiction"
    assert majority_baseline(get_task("cola"), np.array([1, 1, 0]), np.array([1, 0]))["score"] == 0.0
    stsb = majority_baseline(get_task("stsb"), np.array([1.0, 2.0]), np.array([0.0, 5.0, 3.0]))
    assert (stsb["score"], stsb["prediction"]) == (0.0, 1.5)
