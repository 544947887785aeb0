"""The direct chunk engine (preadv + crc32c) reads what zarr reads, names damage, and survives a fork; the
streaming reader's reused buffers stay bounded and never change a batch someone holds."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, build_quietly, flip_byte_in_a_chunk

from read_cache.errors import CacheCorruptError
from read_cache.store import open_cache
from read_cache.store.direct import DirectArray, direct_arrays
from read_cache.training.pools import STORED, CodedBatch, batch_to
from read_cache.training.reader import TIERS, SplitReader
from read_cache.util.mapping import Region

OPTIONS = dict(batch_size=16, seed=3, block_tokens=64, shuffle_blocks=2, shuffle=True, device="cpu")


@pytest.fixture(scope="module")
def int8_cache(tiny_t5: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quietly(tiny_t5, "sst2", glue_dir, tmp_path_factory.mktemp("int8") / "cache", float_dtype="int8", chunk_mb=0.05)


def test_direct_reads_equal_zarr_for_every_raw_array(int8_cache: Path) -> None:
    split = open_cache(int8_cache)["train"]
    direct = direct_arrays(split, tuple(STORED.values()))
    assert {"encoder_hidden", "encoder_hidden_scale", "decoder_hidden", "decoder_hidden_scale"} <= direct.keys()
    assert "cross_attention" not in direct  # 16-bit, zstd: zarr reads it
    for name, rows in direct.items():
        n = rows.shape[0]
        assert n > 2 * rows.chunk_rows  # several chunks, so edges are exercised
        for a, b in [(0, 1), (3, n // 2), (rows.chunk_rows - 1, rows.chunk_rows + 1), (n // 3, n)]:
            out = np.empty((rows.span(a, b), *rows.row_shape), rows.dtype)
            first = rows.read_into(a, b, out)
            assert np.array_equal(out[first : first + b - a], split.array(name)[a:b]), (name, a, b)


def test_a_flipped_byte_or_a_truncated_chunk_is_named(int8_cache: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(int8_cache, tmp_path / "c"))
    chunk = flip_byte_in_a_chunk(copy, "train/encoder_hidden", 0x10)
    split = open_cache(copy)["train"]
    rows = direct_arrays(split, ("encoder_hidden",))["encoder_hidden"]
    out = np.empty((rows.span(0, split.n_tokens), *rows.row_shape), rows.dtype)
    with pytest.raises(CacheCorruptError, match="CRC32C"):
        rows.read_into(0, split.n_tokens, out)
    chunk.write_bytes(chunk.read_bytes()[:-100])
    with pytest.raises(CacheCorruptError, match="truncated"):
        rows.read_into(0, split.n_tokens, out)


def _mapped(rows: DirectArray, chunks: range) -> np.ndarray:
    region = Region(len(chunks) * rows.chunk_bytes)
    rows.map_into(chunks, region, 0)
    return region.array(0, len(chunks) * rows.chunk_bytes).view(rows.dtype).reshape(-1, *rows.row_shape)


def test_mapped_chunks_equal_read_ones_and_name_damage(int8_cache: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(int8_cache, tmp_path / "c"))
    split = open_cache(copy)["train"]
    rows = direct_arrays(split, ("encoder_hidden",))["encoder_hidden"]
    assert rows.mappable  # its chunks are whole pages, so the streaming reader maps this array
    chunks = rows.chunks_of(0, split.n_tokens)
    mapped = _mapped(rows, chunks)
    read = np.empty_like(mapped)
    rows.read_into(0, split.n_tokens, read)
    assert np.array_equal(mapped, read) and not mapped.flags.writeable
    rows.chunk_path(1).unlink()  # a chunk never written (zarr skips chunks of only the fill value) reads as the fill
    assert (_mapped(rows, chunks)[rows.chunk_rows : 2 * rows.chunk_rows] == rows.fill_value).all()
    chunk = flip_byte_in_a_chunk(copy, "train/encoder_hidden", 0x10)
    with pytest.raises(CacheCorruptError, match="CRC32C"):
        _mapped(rows, chunks)
    chunk.write_bytes(chunk.read_bytes()[:-100])
    with pytest.raises(CacheCorruptError, match="truncated"):
        _mapped(rows, chunks)


def test_coded_batches_are_the_same_codes_in_every_tier_and_decode_to_the_float_batches(int8_cache: Path) -> None:
    split = open_cache(int8_cache)["train"]
    floats = list(SplitReader(split, mode="stream", **OPTIONS).epoch(1))
    for mode in TIERS[1:]:  # the device tier decodes on the device: it yields floats
        coded = list(SplitReader(split, mode=mode, coded=True, **OPTIONS).epoch(1))
        plain = list(SplitReader(split, mode="stream", coded=True, **OPTIONS).epoch(1))
        assert len(coded) == len(floats) == len(plain)
        for c, p, f in zip(coded, plain, floats):
            assert isinstance(c, CodedBatch) and c["enc"].dtype == torch.int8 and "enc_scale" in c
            assert c.keys() == p.keys() and all(torch.equal(c[k], p[k]) for k in c)
            moved = batch_to(c, torch.device("cpu"))
            assert moved.keys() == f.keys() and all(torch.equal(moved[k], f[k]) for k in f)


def test_reused_buffers_stay_bounded_and_a_held_epoch_is_unchanged(int8_cache: Path) -> None:
    split = open_cache(int8_cache)["train"]
    reader = SplitReader(split, mode="stream", coded=True, **OPTIONS)
    assert len(reader.windows(0)) > 3  # several windows, so window buffers come round again
    expected = [{k: v.clone() for k, v in b.items()} for b in reader.epoch(0)]
    allocated = reader.batch_ring.allocations, reader.window_ring.allocations
    assert allocated[0] <= reader.batch_ring.keep and allocated[1] <= reader.window_ring.keep
    # The consumer lets each batch go: the rings reuse their slots. Which slots are idle when a batch is made
    # depends on the threads' timing, so an idle slot too small for a batch may still be replaced, once: a
    # replacement is at least as large as the largest slot, which fits every batch of the epoch already seen.
    # So however many epochs run, at most `keep` more slots are ever allocated per ring: memory stays flat.
    for _ in range(6):
        for _ in reader.epoch(0):
            pass
    assert reader.batch_ring.allocations - allocated[0] <= reader.batch_ring.keep
    assert reader.window_ring.allocations - allocated[1] <= reader.window_ring.keep
    held = list(reader.epoch(0))  # the consumer holds every batch: none may be refilled under it
    assert len(held) == len(expected)
    for h, e in zip(held, expected):
        assert all(torch.equal(h[k], e[k]) for k in e)


def _epoch_sum(path: str, queue: multiprocessing.Queue) -> None:
    reader = SplitReader(open_cache(path)["train"], mode="stream", **OPTIONS)
    queue.put(float(sum(b["enc"].double().sum() for b in reader.epoch(0))))


def test_the_engine_survives_a_fork(int8_cache: Path) -> None:
    # A DataLoader's workers are forked from a parent that has read already (zarrs-python issue 171 deadlocks here).
    reader = SplitReader(open_cache(int8_cache)["train"], mode="stream", workers=2, **OPTIONS)
    here = float(sum(b["enc"].double().sum() for b in reader.epoch(0)))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_epoch_sum, args=(str(int8_cache), queue))
    child.start()
    child.join(timeout=HANG_GUARD_S)
    assert child.exitcode == 0
    assert queue.get(timeout=HANG_GUARD_S) == here


def test_an_epoch_can_make_only_some_batches(int8_cache: Path) -> None:
    split = open_cache(int8_cache)["train"]
    for mode in TIERS:
        reader = SplitReader(split, mode=mode, **OPTIONS)
        full = list(reader.epoch(1))
        some = list(reader.epoch(1, batches=[1, 3, len(full) - 1]))
        assert len(some) == 3
        for got, want in zip(some, [full[1], full[3], full[-1]]):
            assert all(torch.equal(got[k], want[k]) for k in want), mode
