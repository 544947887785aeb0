"""CacheDataset: the reader's batches through torch's DataLoader, in workers and under torchrun (2 gloo ranks)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import build_quietly
from test_distributed import launch
from torch.utils.data import DataLoader

import read_cache
from read_cache import CacheDataset
from read_cache.errors import ReadCacheError
from read_cache.training.reader import SplitReader

SMALL_CHUNKS = 0.003  # MiB: 16-token chunks, so the 120 train examples make many blocks to shuffle and share
BATCH = 16


@pytest.fixture(scope="module")
def cache(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_t5, "sst2", glue_dir, tmp_path_factory.mktemp("dataset") / "cache", chunk_mb=SMALL_CHUNKS, batch_size=8)


def reader_batches(cache: Path, epoch: int, **options) -> list[dict[str, torch.Tensor]]:
    reader = SplitReader(read_cache.open_cache(cache)["train"], batch_size=BATCH, shuffle=True, seed=3, block_tokens=64, **options)
    return list(reader.epoch(epoch))


def dataset(cache: Path, **options) -> CacheDataset:
    return CacheDataset(cache, split="train", batch_size=BATCH, shuffle=True, seed=3, block_tokens=64, **options)


def assert_same_batches(ours: list[dict[str, torch.Tensor]], reference: list[dict[str, torch.Tensor]]) -> None:
    assert len(ours) == len(reference) > 2
    for a, b in zip(ours, reference):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert ours[0]["enc"].dtype == torch.float32 and ours[0]["enc"].device.type == "cpu"


@pytest.mark.parametrize("mode", ["stream", "ram"])
def test_in_process_it_yields_the_readers_batches_bit_for_bit(cache: Path, mode: str) -> None:
    ds = dataset(cache, mode=mode)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert_same_batches(list(DataLoader(ds, batch_size=None, num_workers=0)), reader_batches(cache, epoch))
        assert len(ds) == len(reader_batches(cache, epoch))


def test_two_workers_yield_the_readers_order_each_example_once(cache: Path) -> None:
    ds = dataset(cache)
    ds.set_epoch(1)
    ours = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert_same_batches(ours, reader_batches(cache, 1))
    rows = torch.cat([b["rows"] for b in ours]).tolist()
    assert sorted(rows) == list(range(len(read_cache.open_cache(cache)["train"])))


def test_each_process_opens_the_cache_itself(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened in the parent, the reader is not what a forked or spawned worker uses: each process opens its own."""
    ds = dataset(cache)
    assert ds._opened is None  # making the dataset opens nothing
    parent = ds.reader()
    assert ds._opened[0] == os.getpid() and ds.reader() is parent
    assert ds.__getstate__()["_opened"] is None  # a spawned worker gets the location and options only
    for context in ("fork", "spawn"):
        assert_same_batches([b for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)], reader_batches(cache, 0))
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as in a forked child
    assert ds.reader() is not parent


def test_set_epoch_changes_the_order_deterministically(cache: Path) -> None:
    def rows(epoch: int) -> list[int]:
        ds = dataset(cache)
        ds.set_epoch(epoch)
        return torch.cat([b["rows"] for b in ds]).tolist()

    assert rows(0) == rows(0)
    assert rows(0) != rows(1)
    assert sorted(rows(0)) == sorted(rows(1))


def test_bad_options_are_one_line_errors(cache: Path) -> None:
    with pytest.raises(ReadCacheError, match="mode 'device'"):
        dataset(cache, mode="device")
    with pytest.raises(ReadCacheError, match="batch_size 0"):
        CacheDataset(cache, batch_size=0)


RANK_SCRIPT = """
import json, os, sys
from torch.utils.data import DataLoader
from read_cache import CacheDataset
from read_cache.distributed import session

with session("cpu") as launch:  # the library's own group and ordered teardown: no rank leaves under another
    ds = CacheDataset(sys.argv[1], split="train", batch_size=16, shuffle=True, seed=3)
    out = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        out.append([{"rows": b["rows"].tolist(), "weight": float(b.get("weight", 1.0))} for b in DataLoader(ds, batch_size=None, num_workers=int(sys.argv[3]))])
    with open(os.path.join(sys.argv[2], f"rank{launch.rank}.json"), "w") as f:
        json.dump(out, f)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_yield_disjoint_shares_that_cover_the_split(cache: Path, tmp_path: Path, workers: int) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    ranks = launch(lambda rank: [script, cache, tmp_path, workers])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n = len(read_cache.open_cache(cache)["train"])
    for epoch in (0, 1):
        batches = [shares[0][epoch], shares[1][epoch]]
        assert len(batches[0]) == len(batches[1])  # the ranks step in time
        fresh = [[row for b in share if b["weight"] == 1.0 for row in b["rows"]] for share in batches]
        assert not set(fresh[0]) & set(fresh[1])
        assert sorted(fresh[0] + fresh[1]) == list(range(n))
        for share in batches:  # repeats (weight 0) only after the rank's own batches
            weights = [b["weight"] for b in share]
            assert weights == sorted(weights, reverse=True) and set(weights) <= {0.0, 1.0}
    assert [b["rows"] for b in shares[0][0]] != [b["rows"] for b in shares[0][1]]


def test_the_custom_head_example_trains_an_epoch(cache: Path) -> None:
    """examples/custom_head.py, a plain PyTorch loop over CacheDataset, on a tiny cache (DataLoader workers included)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("custom_head", Path(__file__).resolve().parents[1] / "examples" / "custom_head.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main([str(cache), "--epochs", "1", "--batch-size", "16", "--workers", "2"])
    assert result["epoch"] == 1 and result["loss"] > 0
    assert result["validation"]["metric"] == "accuracy" and 0 <= result["validation"]["score"] <= 1


def test_a_worker_cuts_only_its_own_batches_and_pads_as_train_does(tmp_path: Path) -> None:
    from read_cache.training.dataset import worker_batches, worker_steps
    from read_cache.training.train import even_steps

    for n, steps, workers in [(7, 7, 2), (5, 8, 3), (1, 4, 2), (6, 6, 1)]:
        for w in range(workers):
            want = list(itertools.islice(even_steps(iter(range(n)), steps), w, None, workers))
            got = list(worker_steps(iter(worker_batches(n, steps, w, workers)), n, steps, w, workers))
            assert got == want, (n, steps, w, workers)
