"""Decoder-only backbones (causal LMs) end to end on tiny random models made here: llama, qwen2 and gpt2 build, train
and predict; every supported family's hidden states and LM head are checked against transformers itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABEL_WORDS, PREFIX_WORDS, WORDS, build_quietly, one_error, one_line, quick, run_cli

from read_cache.backbone import causal
from read_cache.backbone.causal import DECODER_FAMILY
from read_cache.build import build_cache
from read_cache.config import BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.store import open_cache
from read_cache.tasks.data import load_glue
from read_cache.tasks.specs import get_task
from read_cache.training.reader import SplitReader
from read_cache.training.side_network import expected_parameters, lm_logits
from read_cache.training.train import TrainConfig, evaluate_split, load_run, train

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
D, LAYERS = 32, 2


def make_causal_tokenizer(folder: Path | None = None, *, pad: bool = True, padding_side: str = "right", drop_word: str | None = None):
    """A byte-level BPE tokenizer (GPT-2's, Llama 3's and Qwen's kind: a word's leading space is part of its token)
    trained here on the test sentences and prompts; every text starts with <s>, as Llama's does. `pad=False`: no pad
    token, as GPT-2's. `drop_word`: a normaliser deletes that word, so it tokenises to nothing."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    words = [*PREFIX_WORDS, *LABEL_WORDS, *WORDS, "answer:", "review:"]
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] + [f"sentence: {w}\nanswer: {w}" for w in words]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer)
    if drop_word is not None:
        core.normalizer = normalizers.Replace(Regex(rf"\s*{drop_word}"), "")  # the word and the space before it
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **({"pad_token": "<pad>"} if pad else {})}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, padding_side=padding_side, **specials)
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def family_config(family: str, vocab: int):
    """A tiny random config of each supported family (two layers, width 32)."""
    import transformers as t

    common = dict(vocab_size=vocab, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  max_position_embeddings=128)
    return {
        "llama": lambda: t.LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: t.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen3": lambda: t.Qwen3Config(**common, num_key_value_heads=2, head_dim=8),
        "mistral": lambda: t.MistralConfig(**common, num_key_value_heads=2),
        "gemma": lambda: t.GemmaConfig(**common, num_key_value_heads=2, head_dim=8),
        "gemma2": lambda: t.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0),
        "phi": lambda: t.PhiConfig(**common),
        "phi3": lambda: t.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": lambda: t.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=D, n_layer=LAYERS, n_head=4, bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: t.GPTNeoXConfig(**common),
    }[family]()


def make_tiny_causal(folder: Path, family: str, seed: int = 0, **tokenizer_options) -> Path:
    from transformers import AutoModelForCausalLM

    tok = make_causal_tokenizer(folder, **tokenizer_options)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(family_config(family, len(tok))).eval().save_pretrained(folder)
    return folder


FAMILIES = ("llama", "qwen2", "gpt2")
"""The families built, trained and predicted end to end here (every supported family is checked below)."""


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def sst2_lm(tiny_lm: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Small batches of mixed lengths: right padding is exercised in most of them.
    return build_quietly(tiny_lm, "sst2", glue_dir, tmp_path_factory.mktemp("lm-sst2") / "cache", limit=40, batch_size=7, float_dtype="bfloat16")


@pytest.fixture(scope="session")
def sst2_lm_last(tiny_lm: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_lm, "sst2", glue_dir, tmp_path_factory.mktemp("lm-sst2-last") / "cache", limit=40, batch_size=7,
                         float_dtype="bfloat16", tokens="last")


# --------------------------------------------------------------------------------------------------
# What each family returns (no build: transformers itself, checked against what the code assumes)


@pytest.mark.parametrize("family", DECODER_FAMILY)
def test_each_family_returns_its_normed_last_state_and_the_lm_head_reads_it(family: str) -> None:
    """hidden_states[-1] is the final norm's output, and the cache's LM head (rows, bias, soft cap) gives the model's logits."""
    from transformers import AutoModelForCausalLM

    tok = make_causal_tokenizer()
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(family_config(family, len(tok)), attn_implementation="eager").eval()
    ids = tok(["the film was very good", "a dull plot"], add_special_tokens=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        body = causal.base_model(net)(**ids, output_hidden_states=True)
        logits = net(**ids).logits
    assert len(body.hidden_states) == LAYERS + 1
    torch.testing.assert_close(body.hidden_states[-1], body.last_hidden_state, rtol=0, atol=0)
    _, bias = causal.final_norm(net)  # its values: test_the_final_norm_gain_is_measured_not_read
    assert (bias is not None) == (family in ("gpt2", "gpt_neox", "phi"))
    label_ids = [causal.readout_token(tok, "answer:", w) for w in ("negative", "positive")]
    extras = causal.lm_head_extras(net, label_ids)
    assert (extras["bias"] is not None) == (family == "phi") and (extras["softcap"] is not None) == (family == "gemma2")
    rows = net.get_output_embeddings().weight[label_ids].detach()
    ours = lm_logits(body.hidden_states[-1].reshape(-1, D), rows, 1.0, extras["bias"], extras["softcap"]).reshape(*logits.shape[:2], 2)
    torch.testing.assert_close(ours, logits[..., label_ids], rtol=1e-5, atol=1e-5)


def test_the_final_norm_gain_is_measured_not_read(tmp_path: Path) -> None:
    """Gemma's RMSNorm multiplies by 1 + weight: the recorded gain reproduces the norm, whatever its convention."""
    from transformers import AutoModelForCausalLM

    for family in ("gemma", "llama", "gpt2"):
        net = AutoModelForCausalLM.from_config(family_config(family, 60))
        norm = next(getattr(net.base_model, n) for n in causal.NORM_NAMES if hasattr(net.base_model, n))
        with torch.no_grad():
            for p in norm.parameters():
                p.uniform_(-1, 1)
            x = torch.randn(3, D)
            gain, bias = causal.final_norm(net)
            rms = x / x.pow(2).mean(-1, keepdim=True).add(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))).sqrt()
            if bias is not None:  # LayerNorm: centred first
                centred = x - x.mean(-1, keepdim=True)
                rms = centred / centred.var(-1, unbiased=False, keepdim=True).add(norm.eps).sqrt()
            torch.testing.assert_close(norm(x), rms * gain + (0 if bias is None else bias), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Stage one


def test_the_cache_holds_every_layer_of_every_token_as_a_fresh_fp32_forward(sst2_lm: Path, tiny_lm: Path, glue_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    cache = open_cache(sst2_lm)
    attrs = cache.attrs
    assert attrs["backbone"]["kind"] == "decoder" and attrs["backbone"]["pooling"] == "last"
    assert attrs["backbone"]["n_encoder_layers"] == LAYERS and attrs["backbone"]["n_decoder_layers"] == 0
    template = attrs["task"]["template"]
    assert template == "sst2 sentence: {sentence}\nanswer:" and attrs["build"]["tokens"] == "all"
    assert set(cache.root_arrays()) >= {"lm_head_rows", "final_norm_scale"} and cache.geometry.cross_attention is None
    gain, _ = causal.final_norm(model)
    np.testing.assert_array_equal(cache.root_array("final_norm_scale"), gain.numpy())
    rows = model.get_output_embeddings().weight[attrs["lm_head"]["token_ids"]].detach().numpy()
    np.testing.assert_array_equal(cache.lm_head_rows(), rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)  # the family's class where transformers insists (Qwen2's)
    data = load_glue(get_task("sst2"), glue_dir, 40)
    for split in ("train", "validation", "test"):
        for i in range(0, len(cache[split]), 5):
            ex = cache[split][i]
            ids = tokenizer(template.format(sentence=data[split].texts[i][0]), return_tensors="pt")["input_ids"]
            assert ex.input_ids.tolist() == ids[0].tolist()
            with torch.no_grad():
                fresh = model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in range(LAYERS):
                np.testing.assert_allclose(ex.encoder_hidden[:, layer], fresh[layer + 1][0].numpy(), rtol=2**-8, atol=1e-5)


def test_a_last_token_cache_holds_the_readout_alone(sst2_lm: Path, sst2_lm_last: Path) -> None:
    full, last = open_cache(sst2_lm), open_cache(sst2_lm_last)
    assert last.attrs["build"]["tokens"] == "last" and last.info.tokens == "last"
    for split in ("train", "test"):
        assert len(last[split]) == len(full[split])
        for i in range(len(full[split])):
            a, b = full[split][i], last[split][i]
            assert b.encoder_hidden.shape == (1, LAYERS, D) and b.input_ids.tolist() == a.input_ids[-1:].tolist()
            np.testing.assert_array_equal(b.encoder_hidden[0], a.encoder_hidden[-1])


@pytest.mark.parametrize("tokenizer", ["left-padded", "no pad token"])
def test_padding_side_and_a_missing_pad_token_leave_the_cache_unchanged(tokenizer: str, sst2_lm: Path, glue_dir: Path, tmp_path: Path) -> None:
    """The build pads on the right itself (causal attention: no real token sees a pad), whatever the tokenizer says."""
    family = open_cache(sst2_lm).attrs["backbone"]["model_type"]
    options = {"padding_side": "left"} if tokenizer == "left-padded" else {"pad": False}
    model = make_tiny_causal(tmp_path / "model", family, **options)
    assert (make_causal_tokenizer(**options).pad_token is None) == (tokenizer == "no pad token")
    other = build_quietly(model, "sst2", glue_dir, tmp_path / "cache", limit=40, batch_size=7, float_dtype="bfloat16")
    a, b = open_cache(sst2_lm), open_cache(other)
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(a[split].array("encoder_hidden")[...], b[split].array("encoder_hidden")[...])
        np.testing.assert_array_equal(a[split].array("input_ids")[...], b[split].array("input_ids")[...])


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "float16"])
def test_every_store_format_and_reader_tier_serves_a_decoder_cache(fmt: str, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.training.side_network import SideNetwork, SideNetworkConfig

    model = make_tiny_causal(tmp_path / "model", "llama")
    cache = open_cache(build_quietly(model, "sst2", glue_dir, tmp_path / "cache", limit=20, float_dtype=fmt))
    torch.manual_seed(0)
    net = SideNetwork(SideNetworkConfig(rnn="gru", dim=4, d_model=D, n_encoder_layers=LAYERS, n_decoder_layers=0, encoder_only=True,
                                        causal=True, pooling="last", head="lm"), torch.from_numpy(cache.lm_head_rows()))
    torch.nn.init.normal_(net.up.weight)  # a correction that depends on every layer's states
    logits = {mode: evaluate_split(net, SplitReader(cache["test"], mode=mode, batch_size=8)).logits for mode in ("stream", "ram")}
    np.testing.assert_array_equal(logits["stream"], logits["ram"])
    assert np.isfinite(logits["ram"]).all() and cache.geometry.float_dtype == fmt


def test_dry_run_projects_a_last_token_cache(tiny_lm: Path, glue_dir: Path) -> None:
    code, out, _ = run_cli("build", "--model", tiny_lm, "--task", "sst2", "--data-dir", glue_dir, "--limit", 40, "--dry-run")
    code_last, out_last, _ = run_cli("build", "--model", tiny_lm, "--task", "sst2", "--data-dir", glue_dir, "--limit", 40, "--dry-run", "--tokens", "last")
    assert code == code_last == 0, out + out_last
    tokens_per_example = [float(line.split()[3]) for line in (out, out_last) for line in line.splitlines() if line.startswith("all ")]
    assert tokens_per_example[0] > 3 and tokens_per_example[1] == 1.0


# --------------------------------------------------------------------------------------------------
# Stage two


@pytest.mark.parametrize("head", ["lm", "linear"])
def test_both_heads_train_with_exactly_the_documented_parameters(head: str, sst2_lm: Path, tmp_path: Path) -> None:
    summary = train(quick(sst2_lm, tmp_path / "run", head=head))
    assert summary["head"] == head and summary["pooling"] == "last" and 0 <= summary["test"]["score"] <= 1
    r, d, classes = 8, D, 2
    # docs/decoder-only.md: one GRU g*r*(d + r + 2) (g = 3 gates), Up r*d + d, the joiner's scale d, and the head
    formula = 3 * r * (d + r + 2) + (r * d + d) + d + (0 if head == "lm" else d * classes + classes)
    net, config = load_run(tmp_path / "run")
    assert summary["trainable_parameters"] == formula == expected_parameters(net.config)
    assert config["side_network"]["causal"] is True and config["cache"]["backbone_kind"] == "decoder"


def test_mean_pooling_trains_on_every_token_and_is_refused_on_a_readout_cache(sst2_lm: Path, sst2_lm_last: Path, tmp_path: Path) -> None:
    assert train(quick(sst2_lm, tmp_path / "mean", head="linear", pooling="mean", epochs=1))["pooling"] == "mean"
    with pytest.raises(ReadCacheError, match="--tokens last") as e:
        train(quick(sst2_lm_last, tmp_path / "refused", head="linear", pooling="mean"))
    assert "readout" in one_line(e) and not (tmp_path / "refused").exists()
    with pytest.raises(ReadCacheError, match="--head linear") as e:
        train(quick(sst2_lm, tmp_path / "lm-mean", head="lm", pooling="mean"))
    one_line(e)


def test_a_sweep_trains_both_heads_from_one_read_of_a_decoder_cache(sst2_lm_last: Path, tmp_path: Path) -> None:
    from read_cache.config import SweepConfig
    from read_cache.training.sweep import sweep

    shared = TrainConfig(cache=sst2_lm_last, epochs=1, batch_size=16, progress=False, threads=1)
    report = sweep(SweepConfig(out=tmp_path / "sweep", rnn=("gru",), dim=(4,), lr=(1e-2,), head=("lm", "linear"), shared=shared))
    assert sorted(entry["head"] for entry in report["configs"]) == ["linear", "lm"]
    for entry in report["configs"]:
        net, _ = load_run(entry["run_dir"])
        assert entry["trainable_parameters"] == expected_parameters(net.config)


@pytest.mark.parametrize("which", ["sst2_lm", "sst2_lm_last"])
def test_online_predictions_equal_the_cached_path(which: str, sst2_lm: Path, sst2_lm_last: Path, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.inference.predict import predict

    cache = {"sst2_lm": sst2_lm, "sst2_lm_last": sst2_lm_last}[which]
    summary = train(quick(cache, tmp_path / "run", epochs=1))
    assert summary["head"] == "lm" and summary["trainable_parameters"] > 0
    texts = load_glue(get_task("sst2"), glue_dir, 40)["test"].texts
    net, _ = load_run(tmp_path / "run")
    cached = evaluate_split(net, SplitReader(open_cache(cache)["test"]))
    online = predict(tmp_path / "run", texts)
    np.testing.assert_allclose(online.logits, cached.logits, atol=1e-5, rtol=0)
    assert online.labels[0] in ("negative", "positive")


# --------------------------------------------------------------------------------------------------
# Bad inputs


def test_a_label_word_that_tokenizes_to_nothing_is_a_one_line_error(glue_dir: Path, tmp_path: Path) -> None:
    model = make_tiny_causal(tmp_path / "model", "llama", drop_word="positive")
    with pytest.raises(ReadCacheError, match="'positive' tokenizes to nothing") as e:
        build_quietly(model, "sst2", glue_dir, tmp_path / "cache", limit=20)
    one_line(e)


def test_an_unchecked_causal_family_is_refused_naming_the_supported_ones(glue_dir: Path, tmp_path: Path) -> None:
    from transformers import OPTConfig

    OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path / "opt")
    with pytest.raises(ReadCacheError, match="decoder-only 'opt'") as e:
        build_cache(BuildConfig(model=str(tmp_path / "opt"), task="sst2", data_dir=glue_dir, out=tmp_path / "cache", progress=False))
    message = one_line(e)
    assert "not been checked" in message and all(f in message for f in ("llama", "qwen2", "gpt2", "bert", "t5"))


def test_decoder_options_on_other_models_and_a_bad_prompt_are_one_line_errors(tiny_t5: Path, tiny_lm: Path, glue_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ReadCacheError, match="--tokens last") as e:
        build_quietly(tiny_t5, "sst2", glue_dir, tmp_path / "t5", limit=10, tokens="last")
    one_line(e)
    with pytest.raises(ReadCacheError, match=r"needs exactly \{sentence\}") as e:
        build_quietly(tiny_lm, "sst2", glue_dir, tmp_path / "bad", limit=10, prompt="review: {text}\nanswer:")
    one_line(e)


def test_the_cli_builds_trains_and_predicts_and_bad_inputs_exit_with_one_line(sst2_lm_last: Path, glue_dir: Path, tmp_path: Path) -> None:
    code, _, output = run_cli("train", "--cache", sst2_lm_last, "--dim", 4, "--epochs", 1, "--no-progress", "--out", tmp_path / "run")
    assert code == 0, output
    code, stdout, output = run_cli("predict", "--run", tmp_path / "run", "a lovely film")
    assert code == 0 and stdout.split("\t")[0] in ("negative", "positive"), output
    code, _, output = run_cli("train", "--cache", sst2_lm_last, "--pooling", "mean", "--head", "linear", "--no-progress", "--out", tmp_path / "bad")
    assert code != 0 and "--tokens last" in one_error(output)


def test_drop_last_layers_cuts_a_decoder_only_model(glue_dir: Path, tmp_path: Path) -> None:
    model = make_tiny_causal(tmp_path / "model", "llama")
    cache = open_cache(build_quietly(model, "sst2", glue_dir, tmp_path / "cache", limit=10, float_dtype="bfloat16", drop_last_layers=1))
    assert cache.geometry.n_encoder_layers == LAYERS - 1 and cache["train"][0].encoder_hidden.shape[1] == LAYERS - 1


def test_a_custom_prompt_is_recorded_and_read_online(tiny_lm: Path, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.inference.predict import predict

    prompt = "review: {sentence} answer:"
    cache = build_quietly(tiny_lm, "sst2", glue_dir, tmp_path / "cache", limit=20, float_dtype="bfloat16", prompt=prompt, tokens="last")
    assert open_cache(cache).attrs["task"]["template"] == prompt
    train(quick(cache, tmp_path / "run", epochs=1))
    net, _ = load_run(tmp_path / "run")
    cached = evaluate_split(net, SplitReader(open_cache(cache)["test"]))
    texts = load_glue(get_task("sst2"), glue_dir, 20)["test"].texts
    np.testing.assert_allclose(predict(tmp_path / "run", texts).logits, cached.logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# The baselines on the live backbone (`train --method`)

METHOD_FAMILIES = ("llama", "qwen2", "gpt2", "phi")
"""No biases (llama), q/k/v biases only (qwen2), Conv1D layers with biases (gpt2), an LM head with a bias (phi)."""


@pytest.fixture(scope="module")
def method_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {family: make_tiny_causal(tmp_path_factory.mktemp(f"method-{family}"), family) for family in METHOD_FAMILIES}


@pytest.mark.parametrize("family", METHOD_FAMILIES)
@pytest.mark.parametrize("spec", ["full", "lora-4", "prompt-3", "bitfit", "adapter-4"])
def test_each_baseline_trains_exactly_its_documented_parameters(spec: str, family: str, method_models: dict[str, Path]) -> None:
    from read_cache.backbone.load import load_backbone
    from read_cache.kinds import parse_method
    from read_cache.methods.model import build_task_model, head_parameters

    backbone = load_backbone(str(method_models[family]), device="cpu", dtype="fp32")
    method = parse_method(spec)
    if family == "gpt2" and method.name == "adapter":
        with pytest.raises(ReadCacheError, match="does not know where the sublayers of 'gpt2'") as e:
            build_task_model(backbone, get_task("sst2"), method)
        one_line(e)
        return
    module = build_task_model(backbone, get_task("sst2"), method)
    expected = method.module().expected_parameters(backbone.config, backbone.kind, method.size, backbone.model) + head_parameters(backbone, get_task("sst2"))
    trainable = module.trainable()
    assert sum(p.numel() for p in trainable.values()) == expected > 0
    assert head_parameters(backbone, get_task("sst2")) == 0  # the LM head scores the label words
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    torch.manual_seed(1)
    for _ in range(2):
        ids = torch.randint(10, 300, (4, 7))
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0  # right padding, as the build pads
        loss = torch.nn.functional.cross_entropy(module(ids, mask, None), torch.tensor([0, 1, 0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
    assert moved and moved <= set(trainable), sorted(moved - set(trainable))[:3]


def test_lst_on_a_decoder_only_model_is_a_one_line_refusal(method_models: dict[str, Path]) -> None:
    from read_cache.backbone.load import load_backbone
    from read_cache.kinds import parse_method
    from read_cache.methods.model import build_task_model

    backbone = load_backbone(str(method_models["llama"]), device="cpu", dtype="fp32")
    with pytest.raises(ReadCacheError, match="--method lst is written for T5 and BERT") as e:
        build_task_model(backbone, get_task("sst2"), parse_method("lst"))
    one_line(e)


def test_train_method_on_a_decoder_only_model_writes_a_run_predict_takes(method_models: dict[str, Path], glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.config import MethodConfig
    from read_cache.inference.predict import predict
    from read_cache.methods.train import train_method

    out = tmp_path / "run"
    summary = train_method(MethodConfig(method="lora-4", model=str(method_models["qwen2"]), task="sst2", data_dir=glue_dir, limit=30,
                                        epochs=1, out=out, progress=False, threads=1))
    assert summary["trainable_parameters"] == summary["expected_parameters"] > 0 and 0 <= summary["test"]["score"] <= 1
    first = predict(out, ["a good film", "the plot was dull"])
    assert set(first.labels) <= {"negative", "positive"} and first.logits.shape == (2, 2)


def test_bench_runs_every_method_on_a_decoder_only_model(method_models: dict[str, Path], glue_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from read_cache.bench.run import run_bench
    from read_cache.config import BenchConfig
    from read_cache.kinds import BENCH_METHODS

    cfg = BenchConfig(model=str(method_models["llama"]), task="sst2", out=tmp_path / "bench", data_dir=glue_dir, limit=24, epochs=2,
                      slow_epochs=1, dim=8, batch_size=8)
    report = run_bench(cfg, isolate=False)["methods"]
    assert set(report) == set(BENCH_METHODS)
    backbone_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(method_models["llama"]).parameters())
    assert report["full"]["trainable_parameters"] == backbone_params  # the LM head scores the label words: no new head
    assert report["online"]["trainable_parameters"] == report["cached_ram"]["trainable_parameters"] == 3 * 8 * (D + 8 + 2) + 8 * D + D + D
