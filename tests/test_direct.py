"""The direct chunk engine (preadv + crc32c) reads what zarr reads, names damage, and survives a fork; the
streaming reader's reused buffers stay bounded and never change a batch someone holds."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import HANG_GUARD_S, build_quietly, flip_byte_in_a_chunk

from read_cache.errors import CacheCorruptError
from read_cache.store import open_cache
from read_cache.store.direct import checksum, direct_arrays
from read_cache.store.formats import to_torch_codes
from read_cache.training import staging, windows
from read_cache.training.buffers import BufferRing, layout_bytes
from read_cache.training.pools import STORED, CodedBatch, WindowBatch, batch_to, take_segments
from read_cache.training.reader import TIERS, SplitReader
from read_cache.util.aligned import PAGE, page_aligned

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


def test_the_checksum_is_zarrs_crc32c_continued_over_pieces() -> None:
    """The direct engine's CRC32C library is not zarr's: it must agree with it (google-crc32c, zarr's crc32c
    codec) on every length and at every split point a chunk read in pieces continues from."""
    assert checksum(b"123456789") == 0xE3069283  # RFC 3720's check value
    google_crc32c = pytest.importorskip("google_crc32c")  # zarr >= 3.1's; 3.0 used ICRAR crc32c
    data = np.random.default_rng(0).integers(0, 256, 300_007, dtype=np.uint8)
    for n in (0, 1, 15, 16, 17, 4095, 65_537, 300_007):
        whole = google_crc32c.value(data[:n].tobytes())
        assert checksum(data[:n]) == whole
        for cut in {0, min(1, n), n // 3, n}:
            assert checksum(data[cut:n], checksum(data[:cut])) == whole, (n, cut)


def test_direct_writes_are_the_files_zarr_writes(int8_cache: Path, tmp_path: Path) -> None:
    """The build's direct writer leaves every chunk file byte for byte as zarr-python writes it, the array's
    last partial chunk (padded with the fill value) included; ranges that are not whole chunks are refused."""
    by_zarr, by_direct = (Path(shutil.copytree(int8_cache, tmp_path / name)) for name in ("zarr", "direct"))
    for name, rows in direct_arrays(open_cache(int8_cache)["train"], tuple(STORED.values())).items():
        assert rows.shape[0] % rows.chunk_rows  # a partial last chunk
        values = open_cache(int8_cache)["train"].array(name)[...]
        for copy in (by_zarr, by_direct):
            shutil.rmtree(copy / "train" / name / "c")
        zarr.open_array(by_zarr / "train" / name, mode="r+")[...] = values
        target = direct_arrays(open_cache(by_direct)["train"], (name,))[name]
        middle = rows.chunk_rows * 2
        target.write_rows(0, middle, values[:middle])
        target.write_rows(middle, rows.shape[0], values[middle:])
        files = sorted(p.relative_to(by_zarr) for p in (by_zarr / "train" / name / "c").rglob("*") if p.is_file())
        assert len(files) == len(rows.chunks_of(0, rows.shape[0]))
        for f in files:
            assert (by_direct / f).read_bytes() == (by_zarr / f).read_bytes(), f
        with pytest.raises(ValueError, match="whole chunks"):
            target.write_rows(1, middle, values[1:middle])
        with pytest.raises(ValueError, match="whole chunks"):
            target.write_rows(0, middle - 1, values[: middle - 1])


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


def test_a_chunk_never_written_reads_as_the_fill_value(int8_cache: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(int8_cache, tmp_path / "c"))
    rows = direct_arrays(open_cache(copy)["train"], ("encoder_hidden",))["encoder_hidden"]
    rows.chunk_path(1).unlink()  # zarr skips writing chunks of only the fill value
    out = np.empty((rows.span(0, 3 * rows.chunk_rows), *rows.row_shape), rows.dtype)
    rows.read_into(0, 3 * rows.chunk_rows, out)
    assert (out[rows.chunk_rows : 2 * rows.chunk_rows] == rows.fill_value).all()
    assert not (out[: rows.chunk_rows] == rows.fill_value).all()


def test_read_buffers_start_on_a_page_and_stay_busy_while_a_view_is_held() -> None:
    ring = BufferRing(keep=2)
    views = ring.take({"enc": ((100, 7), np.int8), "label": ((3,), np.int64)})
    assert views["enc"].ctypes.data % PAGE == 0 and views["label"].ctypes.data % 64 == 0
    assert page_aligned(5).ctypes.data % PAGE == 0 and len(page_aligned(5)) == 5
    held = torch.from_numpy(views["label"][1:])  # a view of a view, inside a tensor
    del views
    assert not ring._slots[0].idle()  # the tensor still holds the slot's memory
    del held
    assert ring._slots[0].idle()


def test_windows_read_in_many_jobs_equal_ones_read_whole(int8_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = open_cache(int8_cache)["train"]
    whole = [{k: v.clone() for k, v in b.items()} for b in SplitReader(split, mode="stream", **OPTIONS).epoch(1)]
    monkeypatch.setattr(windows, "JOB_BYTES", 1)  # a job per chunk: each lands at its own rows of the window
    pieces = list(SplitReader(split, mode="stream", workers=3, **OPTIONS).epoch(1))
    assert len(pieces) == len(whole)
    for a, b in zip(pieces, whole):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_coded_batches_are_the_same_codes_in_every_tier_and_decode_to_the_float_batches(int8_cache: Path) -> None:
    split = open_cache(int8_cache)["train"]
    floats = list(SplitReader(split, mode="stream", **OPTIONS).epoch(1))
    gathered = list(SplitReader(split, mode="ram", coded=True, **OPTIONS).epoch(1))  # codes gathered on the host
    streamed = list(SplitReader(split, mode="stream", coded=True, **OPTIONS).epoch(1))  # left in their windows
    assert len(gathered) == len(streamed) == len(floats)
    assert any(len(s.segments) > 1 for s in streamed)  # some batches take examples from two windows
    for c, w, f in zip(gathered, streamed, floats):
        assert isinstance(c, CodedBatch) and c["enc"].dtype == torch.int8 and "enc_scale" in c
        assert isinstance(w, WindowBatch) and "enc" not in w  # the device gathers it
        host = take_segments(w.segments)  # what gathering the window batch on the host copies: the same codes
        assert host.arrays.keys() | w.keys() == c.keys()
        assert all(torch.equal(to_torch_codes(host.arrays[k]), c[k]) for k in host.arrays) and all(torch.equal(w[k], c[k]) for k in w)
        for batch in (c, w):
            moved = batch_to(batch, torch.device("cpu"))
            assert moved.keys() == f.keys() and all(torch.equal(moved[k], f[k]) for k in f)



def test_reused_buffers_stay_bounded_and_a_held_epoch_is_unchanged(int8_cache: Path) -> None:
    split = open_cache(int8_cache)["train"]
    reader = SplitReader(split, mode="stream", coded=True, **OPTIONS)
    assert len(reader.windows(0)) > 3  # several windows, so window buffers come round again
    expected = [{k: v.clone() for k, v in b.items()} for b in reader.epoch(0)]
    allocated = reader.batch_ring.allocations, reader.window_ring.allocations
    assert allocated[0] <= reader.batch_ring.keep and allocated[1] <= reader.window_ring.keep
    # Window slots are sized to the largest window the blocks can make, so one is never replaced for size.
    windows = reader._window_reader
    largest = max(layout_bytes({k: (a.shape, a.dtype) for k, a in windows.read([reader.bounds[b] for b in w.blocks]).arrays.items()})
                  for e in range(4) for w in reader.windows(e))
    assert largest <= reader.window_ring.floor
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


# --------------------------------------------------------------------------------------------------
# Staged windows: each chunk through a thread's small host buffers into a window on the device


def _on_cpu(batches: list) -> list[dict]:
    return [batch_to(b, torch.device("cpu")) for b in batches]


@pytest.mark.parametrize(("workers", "stage_bytes"), [(1, 1000), (3, 1000), (3, None)])
def test_staged_windows_give_the_batches_of_host_windows(
    int8_cache: Path, monkeypatch: pytest.MonkeyPatch, workers: int, stage_bytes: int | None
) -> None:
    """Staged on the CPU (the copy a memcpy), chunks in pieces that do not divide them (1000 bytes) or packed
    whole several to a buffer (the default), many jobs per window: the same batches, bit for bit, as windows
    landed in host memory and as the RAM tier's."""
    split = open_cache(int8_cache)["train"]
    host = _on_cpu(list(SplitReader(split, mode="stream", coded=True, **OPTIONS).epoch(1)))
    ram = list(SplitReader(split, mode="ram", **OPTIONS).epoch(1))
    monkeypatch.setattr(staging, "STAGE_BYTES", stage_bytes or staging.STAGE_BYTES)
    monkeypatch.setattr(windows, "JOB_BYTES", 1 if stage_bytes else windows.JOB_BYTES)
    reader = SplitReader(split, mode="stream", coded=True, stage=True, workers=workers, **OPTIONS)
    assert reader.staged and reader._window_reader is None
    streamed = list(reader.epoch(1))
    chunk = direct_arrays(split, ("encoder_hidden",))["encoder_hidden"].chunk_bytes
    assert (reader._window_reader.stager.piece_bytes < chunk) == (stage_bytes is not None)
    assert reader.window_ring.allocations == 0  # the host held no window
    assert all(isinstance(b, WindowBatch) and not s.pool.arrays for b in streamed for s in b.segments)
    staged = _on_cpu(streamed)
    assert len(staged) == len(host) == len(ram)
    for s, h, r in zip(staged, host, ram):
        assert s.keys() == h.keys() == r.keys()
        assert all(torch.equal(s[k], h[k]) and torch.equal(s[k], r[k]) for k in s)


def test_a_staged_window_names_a_flipped_byte_and_a_truncated_chunk(int8_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = Path(shutil.copytree(int8_cache, tmp_path / "c"))
    chunk = flip_byte_in_a_chunk(copy, "train/encoder_hidden", 0x10)
    monkeypatch.setattr(staging, "STAGE_BYTES", 1000)  # the flipped byte lies in a later piece than the first
    reader = SplitReader(open_cache(copy)["train"], mode="stream", coded=True, stage=True, **OPTIONS)
    with pytest.raises(CacheCorruptError, match=f"{chunk.name}.*CRC32C"):
        list(reader.epoch(0))
    chunk.write_bytes(chunk.read_bytes()[:-100])
    reader = SplitReader(open_cache(copy)["train"], mode="stream", coded=True, stage=True, **OPTIONS)
    with pytest.raises(CacheCorruptError, match="truncated"):
        list(reader.epoch(0))


def test_a_chunk_read_in_pieces_is_checked_whole_and_a_missing_one_is_the_fill_value(int8_cache: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(int8_cache, tmp_path / "c"))
    rows = direct_arrays(open_cache(copy)["train"], ("encoder_hidden",))["encoder_hidden"]
    whole = np.empty(rows.chunk_bytes, np.uint8)
    rows.read_chunk(0, whole)
    pieces, buffers = np.zeros(rows.chunk_bytes, np.uint8), [np.empty(96, np.uint8) for _ in range(2)]
    turn = iter(range(10**9))

    def land(piece: np.ndarray, at: int) -> None:
        pieces[at : at + len(piece)] = piece

    rows.read_chunk_through(0, lambda n: buffers[next(turn) % 2], land, 96)
    assert np.array_equal(pieces, whole)
    rows.chunk_path(0).unlink()
    rows.read_chunk_through(0, lambda n: buffers[next(turn) % 2], land, 96)
    assert (pieces.view(rows.dtype) == rows.fill_value).all()


def test_a_staging_buffer_is_refilled_only_after_its_last_copy_is_done() -> None:
    """The rule of training.staging, with recorded events standing in for CUDA's."""
    waited = []

    class Event:
        def __init__(self, name: str):
            self.name = name

        def synchronize(self) -> None:
            waited.append(self.name)

    mine = staging._ThreadBuffers(torch.device("cpu"), 64)
    first = mine.next_free(64)
    mine.events[0] = Event("copy of buffer 0")  # what `land` records on CUDA
    second = mine.next_free(64)
    assert second is not first and waited == []  # the other buffer had no copy in flight
    again = mine.next_free(64)
    assert again is first and waited == ["copy of buffer 0"] and mine.events[0] is None


def test_the_bench_stages_to_meta_where_the_copy_costs_nothing(int8_cache: Path) -> None:
    """`bench --methods reader` times the host's share of a GPU stream on torch's meta device: the same
    batches' host fields, the states' device copies shaped as on a real device."""
    split = open_cache(int8_cache)["train"]
    cpu = list(SplitReader(split, mode="stream", coded=True, stage=True, **OPTIONS).epoch(1))
    reader = SplitReader(split, mode="stream", coded=True, **{**OPTIONS, "device": "meta"})
    assert reader.staged  # coded batches for a device other than the CPU are staged by default
    meta = list(reader.epoch(1))
    assert len(meta) == len(cpu)
    for m, c in zip(meta, cpu):
        assert m.keys() == c.keys() and all(torch.equal(m[k], c[k]) for k in m)
        moved, real = batch_to(m, torch.device("meta")), batch_to(c, torch.device("cpu"))
        assert moved["enc"].device.type == "meta" and moved["enc"].shape == real["enc"].shape
