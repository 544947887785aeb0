"""The paper's protocol (issue 12): LST's splits and targets, READ-large's truncation, the no-recurrence ablation,
the inf/NaN stop, the dtype default, the seeds, the preset, the Bayesian search and `read-cache glue` end to end."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    SHARED,
    build_quietly,
    make_tokenizer,
    needs_shared,
    one_error,
    run_cli,
)

from read_cache.errors import ReadCacheError
from read_cache.paper import PAPER_AVERAGE, PAPER_LR, PAPER_SCORES, paper_lr
from read_cache.tasks.data import HELD_OUT, SplitData, apply_recipe, load_glue
from read_cache.tasks.specs import PROTOCOLS, TASKS, get_task


def _originals(n_train: int, n_dev: int, regression: bool = False) -> dict[str, SplitData]:
    def split(n: int, source: str) -> SplitData:
        labels = np.linspace(0, 5, n).astype(np.float32) if regression else np.arange(n) % 2
        return SplitData(texts=[(f"{source} {i}",) for i in range(n)], labels=labels, index=np.arange(n), source=source)

    return {"train": split(n_train, "train"), "validation": split(n_dev, "validation")}


def _randperm(n: int) -> np.ndarray:
    generator = torch.Generator()
    generator.manual_seed(42)
    return torch.randperm(n, generator=generator).numpy()


# --------------------------------------------------------------------------------------------------
# --protocol lst: Ladder Side-Tuning's splits


@pytest.mark.parametrize("name", ["cola", "mrpc", "stsb"])
def test_lst_small_task_halves_the_permuted_validation_split(name: str) -> None:
    task = get_task(name)
    splits = apply_recipe(task, _originals(300, 41, task.is_regression), protocol="lst")
    perm = _randperm(41)
    assert splits["validation"].index.tolist() == perm[:20].tolist()
    assert splits["test"].index.tolist() == perm[20:].tolist()
    assert splits["train"].index.tolist() == list(range(300))  # train untouched, in its order
    assert {splits["validation"].source, splits["test"].source} == {"validation"}


def test_lst_large_task_keeps_train_in_permuted_order() -> None:
    splits = apply_recipe(get_task("sst2"), _originals(2_500, 30), protocol="lst")
    perm = _randperm(2_500)
    assert splits["validation"].index.tolist() == perm[:HELD_OUT].tolist()
    assert splits["train"].index.tolist() == perm[HELD_OUT:].tolist()  # permuted, not sorted
    assert splits["test"].index.tolist() == list(range(30)) and splits["test"].source == "validation"
    # the t5 protocol differs: numpy's permutation and train back in its original order
    t5 = apply_recipe(get_task("sst2"), _originals(2_500, 30), protocol="t5")
    assert t5["train"].index.tolist() == sorted(t5["train"].index.tolist())
    assert t5["validation"].index.tolist() != splits["validation"].index.tolist()


def test_lst_rejects_an_unknown_protocol() -> None:
    with pytest.raises(ReadCacheError, match="--protocol"):
        apply_recipe(get_task("sst2"), _originals(20, 10), protocol="glue")


@needs_shared
def test_lst_split_sizes_on_the_real_sst2_files() -> None:
    splits = load_glue(get_task("sst2"), SHARED / "glue", protocol="lst")
    assert {k: len(v) for k, v in splits.items()} == {"train": 66_349, "validation": 1_000, "test": 872}
    perm = _randperm(67_349)
    assert splits["train"].index[:5].tolist() == perm[HELD_OUT : HELD_OUT + 5].tolist()


def test_lst_targets_and_templates() -> None:
    assert get_task("mnli").targets("lst") == ("0", "1", "2")
    assert get_task("cola").targets("t5") == ("unacceptable", "acceptable")
    assert get_task("stsb").targets("lst") == ()  # STS-B stays regression under both protocols
    mnli = get_task("mnli")
    row = {"hypothesis": "H.", "premise": "P."}
    assert mnli.t5_input(row, "lst") == "mnli premise: P. hypothesis H."
    assert mnli.t5_input(row) == "mnli hypothesis: H. premise: P."
    assert get_task("qnli").t5_input({"question": "Q?", "sentence": "S."}, "lst") == "qnli question: Q? sentence: S."


# --------------------------------------------------------------------------------------------------
# The real T5 tokenizer: distinct first tokens, and the lm head equals T5's own logits


def _real_vocab_t5(folder: Path, **shape: int) -> Path:
    """A random T5 with the real tokenizer and vocabulary, but tiny width (and `shape` overrides)."""
    from transformers import T5Config, T5ForConditionalGeneration

    base = json.loads((SHARED / "t5-configs" / "t5-small.json").read_text())
    base.update({"d_model": 16, "d_kv": 4, "d_ff": 32, "num_heads": 2, "num_layers": 2, "num_decoder_layers": 2, "dropout_rate": 0.0})
    base.update(shape)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(**base)).eval().save_pretrained(folder)
    for f in (SHARED / "t5-tokenizer").iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    return folder


@needs_shared
def test_label_first_tokens_are_distinct_for_every_task_and_protocol() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "t5-tokenizer")
    for task in TASKS.values():
        for protocol in PROTOCOLS:
            words = task.targets(protocol)
            firsts = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
            assert len(set(firsts)) == len(firsts), (task.name, protocol, words, firsts)
    # the facts: "0" starts with a bare "▁" (id 3); "1" and "2" are single pieces
    assert tok("0", add_special_tokens=False)["input_ids"][0] == 3
    assert len(tok("1", add_special_tokens=False)["input_ids"]) == 1


@needs_shared
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_lm_head_logits_equal_t5s_own_logits(tmp_path: Path, protocol: str) -> None:
    from read_cache.backbone.inputs import model_inputs, pad, tokenize
    from read_cache.backbone.load import load_backbone

    model = _real_vocab_t5(tmp_path / "t5")
    backbone = load_backbone(str(model), dtype="fp32", device="cpu")
    task = get_task("mnli")
    lm = backbone.lm_head(task.targets(protocol))
    texts = [("A cat sleeps.", "The cat naps on the mat."), ("It rains.", "The sun shines.")]
    tokenized = tokenize(backbone.tokenizer, *model_inputs("t5", task, texts, protocol), 64)
    ids, mask = pad(tokenized.ids, 0)
    states = backbone.forward(ids, mask)
    ours = lm["output_scale"] * states.decoder_hidden[:, -1] @ torch.from_numpy(lm["rows"]).T  # what the lm head computes
    start = torch.zeros((len(texts), 1), dtype=torch.long)
    with torch.no_grad():
        theirs = backbone.model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0, lm["token_ids"]]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@needs_shared
def test_lst_cache_records_protocol_and_digit_targets(tmp_path: Path, glue_dir: Path) -> None:
    from read_cache.store import open_cache

    model = _real_vocab_t5(tmp_path / "t5")
    cache = open_cache(build_quietly(model, "cola", glue_dir, tmp_path / "cache", protocol="lst", limit=12, dtype="fp32", float_dtype="float16"))
    assert cache.attrs["build"]["protocol"] == "lst" and cache.attrs["data"]["protocol"] == "lst"
    assert cache.attrs["task"]["label_words"] == ["0", "1"] and cache.attrs["lm_head"]["token_ids"][0] == 3
    assert "Ladder Side-Tuning" in cache.attrs["data"]["split_recipe"]
    # The cached path (no backbone): the lm head over the cached decoder state equals T5's own logits for "0", "1".
    from transformers import T5ForConditionalGeneration

    from read_cache.training.side_network import SideNetwork, SideNetworkConfig

    net = SideNetwork(SideNetworkConfig(rnn="none", d_model=16, n_encoder_layers=2, n_decoder_layers=2, head="lm",
                                        output_scale=cache.attrs["lm_head"]["output_scale"]), torch.from_numpy(cache.lm_head_rows()))
    t5 = T5ForConditionalGeneration.from_pretrained(model).eval()
    split = cache["test"]
    offsets = split.array("offsets")[:]
    for i in range(3):
        example = split[i]
        ids = torch.from_numpy(np.asarray(split.array("input_ids")[offsets[i] : offsets[i + 1]], dtype=np.int64))[None]
        ours = net(enc=torch.from_numpy(example.encoder_hidden), token_example=torch.zeros(len(ids[0]), dtype=torch.long), n_examples=1,
                   cross=torch.from_numpy(example.cross_attention), dec=torch.from_numpy(example.decoder_hidden)[None])
        with torch.no_grad():
            theirs = t5(input_ids=ids, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long)).logits[:, 0, cache.attrs["lm_head"]["token_ids"]]
        torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)  # float16 storage
    with pytest.raises(ReadCacheError, match="protocol"):  # resuming with the other protocol is refused
        build_quietly(model, "cola", glue_dir, tmp_path / "cache", protocol="t5", limit=12)


# --------------------------------------------------------------------------------------------------
# READ-large: the model is truncated before the forward pass


def test_drop_last_layers_on_a_t5_large_shaped_model(tmp_path: Path, glue_dir: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    from read_cache.store import open_cache

    folder = tmp_path / "t5-large-shaped"
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    config = T5Config(  # T5-large's depth (24 + 24 layers, as ../shared/t5-configs/t5-large.json), tiny width
        vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=24, num_decoder_layers=24, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    full = T5ForConditionalGeneration(config).eval()
    full.save_pretrained(folder)
    cache = open_cache(build_quietly(folder, "sst2", glue_dir, tmp_path / "cache", limit=3, drop_last_layers=4, float_dtype="float16", dtype="fp32"))
    assert (cache.geometry.n_encoder_layers, cache.geometry.n_decoder_layers) == (20, 20)
    assert cache.attrs["build"]["drop_last_layers"] == 4 and cache.attrs["backbone"]["drop_last_layers"] == 4
    example = cache["train"][0]
    assert example.encoder_hidden.shape[1:] == (20, 16) and example.decoder_hidden.shape == (20, 16)
    # Cached layer 20 is block 20's output through the final layer norm: the 20-layer model's last state,
    # not the 24-layer model's 20th hidden state (which is not normalised).
    ids = torch.from_numpy(np.asarray(cache["train"].array("input_ids")[: int(cache["train"].array("offsets")[1])], dtype=np.int64))[None]
    with torch.no_grad():
        hidden = full.encoder(input_ids=ids, output_hidden_states=True).hidden_states
        expected = full.encoder.final_layer_norm(hidden[20])[0]
    torch.testing.assert_close(torch.from_numpy(example.encoder_hidden[:, 19]), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(example.encoder_hidden[:, 5]), hidden[6][0], rtol=2e-3, atol=2e-3)


def test_drop_last_layers_refuses_dropping_everything(tmp_path: Path, tiny_t5: Path, glue_dir: Path) -> None:
    with pytest.raises(ReadCacheError, match="--drop-last-layers 3 leaves no layer"):
        build_quietly(tiny_t5, "sst2", glue_dir, tmp_path / "cache", limit=4, drop_last_layers=3)
    assert one_error(run_cli("build", "--model", tiny_t5, "--task", "sst2", "--drop-last-layers", "-1")[2]).startswith("error: --drop-last-layers -1")


# --------------------------------------------------------------------------------------------------
# --no-recurrence


def test_no_recurrence_parameter_count_matches_its_formula() -> None:
    from read_cache.training.side_network import (
        SideNetwork,
        SideNetworkConfig,
        count_trainable,
        expected_parameters,
    )

    gru = 3 * 256 * (768 + 256 + 2)  # one GRU(768 -> 256): 787,968 as in DESIGN section 1
    assert gru == 787_968
    shared = SideNetworkConfig(rnn="gru", dim=256, d_model=768, n_encoder_layers=12, n_decoder_layers=12)
    ablation = SideNetworkConfig(rnn="gru", dim=256, d_model=768, n_encoder_layers=12, n_decoder_layers=12, recurrence=False)
    rest = 196_608 + 197_376 + 2 * 768  # Psi, Up, the two norm scales
    assert count_trainable(SideNetwork(shared)) == 2 * gru + rest == expected_parameters(shared)
    assert count_trainable(SideNetwork(ablation)) == 24 * gru + rest == expected_parameters(ablation)
    lstm = SideNetworkConfig(rnn="lstm", dim=8, d_model=16, n_encoder_layers=5, encoder_only=True, n_decoder_layers=0,
                             head="linear", num_labels=3, recurrence=False)
    assert count_trainable(SideNetwork(lstm)) == 5 * 4 * 8 * (16 + 8 + 2) + (8 * 16 + 16) + 16 + (16 * 3 + 3) == expected_parameters(lstm)


def test_no_recurrence_cells_differ_per_layer_and_train(stsb_cache: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("train", "--cache", stsb_cache, "--rnn", "gru", "--dim", "8", "--epochs", "1", "--no-recurrence",
                              "--out", tmp_path / "run", "--no-progress")
    assert code == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    gru = 3 * 8 * (32 + 8 + 2)
    assert summary["trainable_parameters"] == 3 * gru + 2 * gru + 8 * 32 + (8 * 32 + 32) + 2 * 32 + 33
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["side_network"]["recurrence"] is False


# --------------------------------------------------------------------------------------------------
# Numerical safety


def test_nan_in_a_layer_stops_the_build_naming_it(tmp_path: Path, tiny_t5: Path, glue_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import read_cache.build as build_module

    real_load = build_module.load_backbone

    def poisoned(*args, **kwargs):
        backbone = real_load(*args, **kwargs)
        block = backbone.model.encoder.block[1]  # the second encoder layer
        block.register_forward_hook(lambda module, inputs, output: (output[0] * float("nan"), *output[1:]))
        return backbone

    monkeypatch.setattr(build_module, "load_backbone", poisoned)
    with pytest.raises(ReadCacheError, match=r"inf/NaN in encoder layer 2 of 3.*--dtype bf16"):
        build_quietly(tiny_t5, "sst2", glue_dir, tmp_path / "cache", limit=8)


def test_float16_storage_overflow_is_an_error_naming_the_layer() -> None:
    from read_cache.backbone.forward import to_stored

    states = torch.zeros(4, 3, 8)
    assert to_stored(states, "float16", "encoder").dtype == np.float16
    states[2, 1, 5] = 1e5  # beyond float16's 65,504; bfloat16 keeps it
    with pytest.raises(ReadCacheError, match=r"storing as float16 overflowed in encoder layer 2 of 3; rebuild with --store-dtype bfloat16"):
        to_stored(states, "float16", "encoder")
    from read_cache.store import decode_floats

    assert decode_floats(to_stored(states, "bfloat16", "encoder"), "bfloat16")[2, 1, 5] == pytest.approx(1e5, rel=1e-2)


def test_fp16_is_never_the_default_for_t5(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from read_cache.util import device

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.default_compute_dtype("cuda", "t5") == "fp32"
    assert device.default_compute_dtype("cuda", "encoder") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.default_compute_dtype("cuda", "t5") == "bf16"
    with caplog.at_level(logging.WARNING):
        device.warn_if_risky_dtype("fp16", "t5")
        device.warn_if_risky_dtype("fp16", "encoder")
    assert len(caplog.records) == 1 and "65,504" in caplog.records[0].getMessage()


# --------------------------------------------------------------------------------------------------
# --preset paper, --seeds, the Bayesian search


def test_paper_tables() -> None:
    assert paper_lr("cola") == 3.29e-4 and paper_lr("mrpc", "read-large") == 1.43e-3
    assert set(PAPER_LR["read"]) == set(PAPER_SCORES["read"]) == {"cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb"}
    # Table 1 prints Avg. 84.97 (READ) and 85.73 (READ-large), which are not the means of its seven columns:
    assert round(statistics.fmean(PAPER_SCORES["read"].values()), 2) == 84.08
    assert PAPER_AVERAGE == {"read": 84.97, "read-large": 85.73}


def test_train_preset_paper_and_seeds(stsb_cache: Path, tmp_path: Path) -> None:
    code, stdout, output = run_cli("train", "--cache", stsb_cache, "--preset", "paper", "--epochs", "2", "--dim", "8", "--seeds", "2",
                                   "--out", tmp_path / "runs", "--no-progress")
    assert code == 0, output
    report = json.loads((tmp_path / "runs" / "seeds.json").read_text())
    summaries = [json.loads((tmp_path / "runs" / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert [s["lr"] for s in summaries] == [4.6e-5, 4.6e-5]  # Table 9, READ, STS-B
    assert [s["batch_size"] for s in summaries] == [96, 96] and [s["seed"] for s in summaries] == [0, 1]
    tests = [s["test"]["score"] for s in summaries]
    assert report["test"]["mean"] == pytest.approx(statistics.fmean(tests))
    assert report["test"]["std"] == pytest.approx(statistics.stdev(tests))
    assert "±" in stdout


def test_sweep_seeds_ranks_by_mean_validation(stsb_cache: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("sweep", "--cache", stsb_cache, "--rnn", "gru/8,rnn/8", "--lr", "1e-3", "--epochs", "1", "--seeds", "2",
                              "--out", tmp_path / "sweep", "--no-progress")
    assert code == 0, output
    report = json.loads((tmp_path / "sweep" / "seeds.json").read_text())
    assert report["seeds"] == [0, 1] and len(report["configs"]) == 2
    for entry in report["configs"]:
        per_seed = [json.loads((Path(run) / "summary.json").read_text())["validation"]["score"] for run in entry["runs"]]
        assert entry["validation"]["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert report["best"]["validation"]["mean"] == max(e["validation"]["mean"] for e in report["configs"])


def test_bayesian_search_starts_from_table9_and_tells_the_mean(stsb_cache: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("sweep", "--cache", stsb_cache, "--preset", "paper", "--rnn", "gru/8,lstm/4", "--rounds", "3",
                              "--seeds", "2", "--epochs", "1", "--out", tmp_path / "search", "--no-progress")
    assert code == 0, output
    report = json.loads((tmp_path / "search" / "search.json").read_text())
    assert report["first_lr"] == 4.6e-5 and report["seeds"] == [0, 1]
    for arch, result in report["architectures"].items():
        lrs = [t["lr"] for t in result["trials"]]
        assert len(lrs) == 3 and lrs[0] == 4.6e-5 and all(1e-6 <= lr <= 3e-3 for lr in lrs)
        assert result["best"]["validation"]["mean"] == max(t["validation"]["mean"] for t in result["trials"])
        for trial in result["trials"]:
            assert len(trial["runs"]) == 2 and trial["validation"]["mean"] == pytest.approx(statistics.fmean(trial["validation"]["values"]))
    best_arch = max(report["architectures"], key=lambda a: report["architectures"][a]["best"]["validation"]["mean"])
    assert report["best_architecture"] == best_arch


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("build", "--model", "m", "--task", "sst2", "--protocol", "glue"), "--protocol"),
        (("train", "--preset", "fast"), "--preset"),
        (("glue", "--model", "m", "--out", "o", "--tasks", "sst2,nope"), "unknown task"),
        (("glue", "--model", "m", "--out", "o", "--seeds", "0"), "--seeds 0"),
        (("glue", "--model", "m", "--out", "o", "--rounds", "0"), "--rounds 0"),
        (("glue", "--model", "m", "--out", "o", "--rnn", "gru"), "--rnn entry 'gru'"),
    ],
)
def test_bad_flags_are_one_line_errors(args: tuple[str, ...], flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a flag that slipped through must not write into the working tree
    code, _, output = run_cli(*args)
    assert code == 2 and flag in one_error(output)


# --------------------------------------------------------------------------------------------------
# read-cache glue, end to end


def test_glue_end_to_end(tmp_path: Path, tiny_t5: Path, glue_dir: Path) -> None:
    out = tmp_path / "glue"
    code, stdout, output = run_cli(
        "glue", "--model", tiny_t5, "--data-dir", glue_dir, "--tasks", "sst2,stsb", "--limit", "24", "--epochs", "1",
        "--rounds", "1", "--seeds", "2", "--rnn", "gru/8,rnn/4", "--out", out, "--no-progress",
    )
    assert code == 0, output
    report = json.loads((out / "glue.json").read_text())
    assert set(report["tasks"]) == {"sst2", "stsb"} and report["seeds"] == 2
    quality = report["architecture_quality"]
    assert report["selected_architecture"] == max(quality, key=quality.get)
    for task, row in report["tasks"].items():
        search = json.loads((out / "search" / task / "search.json").read_text())
        best = search["architectures"][report["selected_architecture"]]["best"]
        assert row["test_mean"] == pytest.approx(100 * best["test"]["mean"]) and len(row["test_values"]) == 2
        assert row["difference"] == pytest.approx(row["test_mean"] - PAPER_SCORES["read"][task])
    for arch, q in quality.items():  # the paper's selection: mean over tasks of each architecture's best validation
        bests = [json.loads((out / "search" / t / "search.json").read_text())["architectures"][arch]["best"]["validation"]["mean"] for t in ("sst2", "stsb")]
        assert q == pytest.approx(100 * statistics.fmean(bests))
    table = (out / "glue.md").read_text()
    assert "| READ (paper, T5-base) | 93.80 | 87.77 |" in table and "difference" in table and "±" in table
    assert (out / "glue.png").stat().st_size > 0 and table in stdout
    # a second run finds complete caches and does not rebuild them
    from read_cache.config import GlueConfig
    from read_cache.protocol.glue import ensure_cache

    marker = (out / "caches" / "sst2" / "zarr.json").stat().st_mtime_ns
    ensure_cache(GlueConfig(model=str(tiny_t5), out=out, data_dir=glue_dir, tasks=("sst2",), limit=24, progress=False), "sst2")
    assert (out / "caches" / "sst2" / "zarr.json").stat().st_mtime_ns == marker
    assert not math.isnan(report["average"]["ours"])
