"""Shared fixtures: a tiny random T5 with a tokenizer made here, and GLUE-format rows made here.

Nothing is downloaded. Tests that need the real files in ../shared skip when it is absent.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network: without this, a hub lookup retries for ~25 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Tests never read or write the user's caches: set before anything is imported (module-scoped fixtures
# build caches before any per-test fixture runs, and huggingface libraries read HF_HOME on import).
# CI proves it by running the suite with HOME mounted read-only (.ci/run).
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="read-cache-tests-"))
os.environ["READ_CACHE_HOME"] = str(_SESSION_HOME / "read-cache-home")
os.environ["HF_HOME"] = str(_SESSION_HOME / "huggingface")
os.environ["MPLCONFIGDIR"] = str(_SESSION_HOME / "matplotlib")

SHARED = Path(__file__).resolve().parents[2] / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "glue").is_dir(), reason="../shared is not present (only in the project's workspace)")

WORDS = (
    "the a film movie story actor plot music scene ending cast script was is very quite not really "
    "good great fine superb lovely bad awful dull boring weak and but with of to it this that"
).split()
LABEL_WORDS = ["negative", "positive", "unacceptable", "acceptable", "not_equivalent", "equivalent"]
PREFIX_WORDS = ["sst2", "sentence:", "sentence1:", "sentence2:", "stsb", "mrpc", "cola"]
POSITIVE = {"good", "great", "fine", "superb", "lovely"}


def make_tokenizer(folder: Path):
    """A word-level tokenizer with T5's special tokens (pad 0, </s> 1, <unk> 2), saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *PREFIX_WORDS, *LABEL_WORDS, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


HANG_GUARD_S = 900
"""Timeout of a test's child process: a guard against a hang, never a timing assertion. Generous, so a
machine running something else beside the suite (CI, a busy loop) never trips it: a child that ends,
however slowly, passes or fails on what it did."""


def make_tiny_t5(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    T5ForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


def build_quietly(model: Path, task: str, data_dir: Path, out: Path, **options) -> Path:
    """build_cache into `out` without touching the real 'last cache' pointer; returns `out`."""
    from read_cache.build import build_cache
    from read_cache.config import BuildConfig

    # fp32 unless a test asks otherwise: on CPUs with AVX512-BF16 or AMX the default compute is bf16, and the
    # tests that compare the cache with a fresh fp32 forward pass (or online with cached) need the same math.
    options.setdefault("dtype", "fp32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("READ_CACHE_HOME", str(out.parent / "home"))
        build_cache(BuildConfig(model=str(model), task=task, data_dir=data_dir, out=out, progress=False, **options))
    return out


def run_cli(*args: object) -> tuple[int, str, str]:
    """Run `read-cache ARGS` in-process: exit code, stdout, and everything the user sees."""
    from typer.testing import CliRunner

    from read_cache.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.output


def cache_files(path: Path) -> dict[str, bytes]:
    """Every file of a cache, metadata and chunks, by relative path: for byte-for-byte comparisons."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def flip_byte_in_a_chunk(cache: Path, array: str, mask: int) -> Path:
    """XOR the middle byte of one chunk file of `array` (e.g. "train/encoder_hidden") with `mask`; returns the file."""
    chunk = next((cache / array / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= mask
    chunk.write_bytes(bytes(data))
    return chunk


def one_error(output: str) -> str:
    """The single `error:` line a bad input must produce."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_glue(root: Path, n_train: int = 120, n_dev: int = 40, seed: int = 0) -> Path:
    """SST-2, CoLA and STS-B folders in the original GLUE TSV layout, with learnable labels."""
    rng = random.Random(seed)

    def sst2_rows(n: int) -> list[str]:
        rows = []
        for _ in range(n):
            text = sentence(rng, rng.randint(3, 12))
            rows.append(f"{text}\t{int(bool(POSITIVE & set(text.split())))}")
        return rows

    (root / "SST-2").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        (root / "SST-2" / name).write_text("sentence\tlabel\n" + "\n".join(sst2_rows(n)) + "\n")
    (root / "CoLA").mkdir()
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [f"src\t{rng.randint(0, 1)}\t\t{sentence(rng, rng.randint(2, 9))}" for _ in range(n)]
        (root / "CoLA" / name).write_text("\n".join(rows) + "\n")
    (root / "STS-B").mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [
            f"{i}\tg\tf\ty\t{i}\ts\ts\t{sentence(rng, rng.randint(2, 8))}\t{sentence(rng, rng.randint(2, 8))}\t{rng.uniform(0, 5):.3f}"
            for i in range(n)
        ]
        (root / "STS-B" / name).write_text(header + "\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def stsb_cache(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_t5, "stsb", glue_dir, tmp_path_factory.mktemp("stsb") / "cache", limit=60)


@pytest.fixture(autouse=True)
def _isolated_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the 'last cache built' pointer, default cache paths and default run folders (./runs) in each test's tmp folder."""
    monkeypatch.setenv("READ_CACHE_HOME", str(tmp_path / "read-cache-home"))
    monkeypatch.chdir(tmp_path)


def one_line(error: pytest.ExceptionInfo) -> str:
    """The message of a raised error, which must be a single line."""
    message = str(error.value)
    assert "\n" not in message
    return message


def quick(cache: Path, out: Path, **changes):  # noqa: ANN201 - TrainConfig, imported late (no torch at collection)
    """A run of seconds on a tiny cache: an RNN of 8, two epochs."""
    from read_cache.training.train import TrainConfig

    return TrainConfig(**{**dict(cache=cache, out=out, dim=8, epochs=2, batch_size=16, lr=1e-2, progress=False, threads=1), **changes})
