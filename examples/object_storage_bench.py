"""How fast a training epoch reads a cache from S3: against local disk, and with latency against without.

    python examples/object_storage_bench.py /work/scratch/i11/sst2-2000 --latency-ms 20 --rounds 3

Starts a local S3 server (moto, 127.0.0.1, in a child process), uploads the cache's tree to s3://bench/cache, and puts
two small TCP proxies in front of it: one holds every request `--latency-ms` before passing it on (what a
real object store's first-byte latency costs), the other 0 ms (the same hop and proxy CPU, no latency:
the fair baseline for "latency hidden"). Then times full epochs of the streaming training reader
(`SplitReader`, shuffled, batch 96: reading, decoding and assembling batches, no training step) as
training reads them (each epoch's first window read ahead during the one before, the next epoch's
during it: an untimed warm-up epoch first) over: local disk; the S3 server direct; behind each proxy;
each through zarr's ObjectStore (obstore) and FsspecStore (s3fs), with 1 and with `--inflight` block
reads in flight. Configurations alternate within each round, so a change in the machine's load hits all
of them alike. Prints a markdown table (median seconds per epoch, examples/s, ratio to local and, behind
the latency proxy, to the 0 ms proxy) and writes `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import statistics
import threading
import time
from pathlib import Path

import psutil

import read_cache
from read_cache.store.location import Location
from read_cache.training.reader import SplitReader

# --------------------------------------------------------------------------------------------------
# A local S3 server, and a proxy that adds latency


def serve(ports: multiprocessing.Queue, delay_s: float) -> None:
    """The S3 server and the proxy, in a process of their own: a real object store is another machine,
    and in the reader's process they would fight it for the GIL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    ports.put((port, start_delay_proxy(port, delay_s), start_delay_proxy(port, 0.0)))
    threading.Event().wait()


def start_s3(delay_s: float) -> tuple[str, str, str, int]:
    """(server URL, latency proxy URL, 0 ms proxy URL, server pid), serving from a child process."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    ports: multiprocessing.Queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=serve, args=(ports, delay_s), daemon=True)
    child.start()
    server, proxy, zero = ports.get(timeout=60)
    return f"http://127.0.0.1:{server}", f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{zero}", child.pid


def start_delay_proxy(upstream_port: int, delay_s: float) -> int:
    """A TCP proxy on 127.0.0.1 that holds each piece of a request `delay_s` before forwarding it."""
    ready: dict[str, int] = {}
    started = threading.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await reader.read(1 << 20):  # big reads: the proxy's own CPU is the harness's, not S3's
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(client_r, up_w, delay_s), pipe(up_r, client_w, 0.0))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready["port"] = server.sockets[0].getsockname()[1]
        started.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), name="delay-proxy", daemon=True).start()
    started.wait()
    return ready["port"]


def upload(cache_dir: Path, url: str, endpoint: str, split: str) -> int:
    """Copy the cache tree into the bucket: everything of `split`, only metadata of the other splits."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    other = {"train", "validation", "test"} - {split}
    files = [p for p in files if not (p.relative_to(cache_dir).parts[0] in other and "c" in p.relative_to(cache_dir).parts)]

    def put(p: Path) -> int:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(cache_dir).as_posix()}", Body=p.read_bytes())
        return p.stat().st_size

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(put, files))


# --------------------------------------------------------------------------------------------------
# Timing


def make_reader(location: Location, split: str, inflight: int) -> SplitReader:
    """Opened once, as training does (opening reads the small arrays: offsets, labels); inflight 0: the reader's default."""
    return SplitReader(read_cache.open_cache(location)[split], batch_size=96, shuffle=True, seed=0, mode="stream", inflight=inflight or None)


def time_epoch(reader: SplitReader, epoch: int, server: psutil.Process) -> tuple[float, int, float, float]:
    """Wall seconds, examples, CPU seconds of this (the reader's) process and of the S3 server + proxies, of
    epoch `epoch` as training reads it (its first window was read ahead by the epoch before; the next
    epoch's is read during it, and waited for)."""
    started, cpu, server_cpu = time.perf_counter(), time.process_time(), sum(server.cpu_times()[:2])
    n = sum(len(batch["label"]) for batch in reader.epoch(epoch, next_epoch=epoch + 1))
    reader.wait_read_ahead()
    return time.perf_counter() - started, n, time.process_time() - cpu, sum(server.cpu_times()[:2]) - server_cpu


def time_ram_load(location: Location, split: str) -> float:
    """`--reader ram` (auto's choice where the split fits the budget): the whole split read once."""
    reader = SplitReader(read_cache.open_cache(location)[split], batch_size=96, mode="ram")
    started = time.perf_counter()
    reader.load()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--inflight", default="0", help="comma-separated block reads in flight to try besides 1 (0: the reader's default)")
    parser.add_argument("--backends", default="obstore,fsspec", help="comma-separated zarr stores to time: obstore, fsspec (s3fs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    endpoint, proxy, zero_proxy, server_pid = start_s3(args.latency_ms / 1000)
    server = psutil.Process(server_pid)
    url = "s3://bench/cache"
    uploaded = upload(args.cache, url, endpoint, args.split)
    logging.info("uploaded %.1f MB to %s; proxy with %.0f ms at %s", uploaded / 1e6, endpoint, args.latency_ms, proxy)

    def s3(endpoint_url: str, backend: str) -> Location:
        key = "endpoint" if backend == "obstore" else "endpoint_url"
        options = {key: endpoint_url} if backend == "obstore" else {key: endpoint_url, "skip_instance_cache": True}
        return Location.parse(url, options, backend=backend)

    lat = f"s3 +{args.latency_ms:.0f} ms"
    configs = [("local disk", Location.parse(args.cache), 1)]
    for where, ep in (("s3 direct", endpoint), ("s3 +0 ms", zero_proxy), (lat, proxy)):
        for backend in args.backends.split(","):
            for inflight in (1, *map(int, args.inflight.split(","))):
                configs.append((f"{where}, {backend}", s3(ep, backend), inflight))
    readers = [make_reader(location, args.split, inflight) for _, location, inflight in configs]
    configs = [(name, location, reader.inflight) for (name, location, _), reader in zip(configs, readers)]
    times: dict[str, list[float]] = {f"{name} x{k}": [] for name, _, k in configs}
    cpus: dict[str, list[tuple[float, float]]] = {key: [] for key in times}
    ram_configs = [("local disk", configs[0][1]), ("s3 direct, obstore", s3(endpoint, "obstore")), (f"{lat}, obstore", s3(proxy, "obstore"))]
    ram_times: dict[str, list[float]] = {name: [] for name, _ in ram_configs}
    examples = 0
    for reader in readers:  # the warm-up: reads epoch 1's first window ahead, as training's epoch 0 would
        time_epoch(reader, 0, server)
    load = [os.getloadavg()]
    for r in range(1, args.rounds + 1):
        for (name, _, inflight), reader in zip(configs, readers):
            seconds, examples, cpu, server_cpu = time_epoch(reader, r, server)
            times[f"{name} x{inflight}"].append(seconds)
            cpus[f"{name} x{inflight}"].append((cpu, server_cpu))
            logging.info("round %d %-28s x%-3d %.2f s", r, name, inflight, seconds)
        for name, location in ram_configs:
            ram_times[name].append(time_ram_load(location, args.split))
        load.append(os.getloadavg())
    local = statistics.median(times["local disk x1"])
    rows = []
    for (name, _, inflight), key in zip(configs, times):
        med = statistics.median(times[key])
        cpu = statistics.median(c for c, _ in cpus[key])
        server_cpu = statistics.median(c for _, c in cpus[key])
        zero_key = key.replace(lat, "s3 +0 ms") if key.startswith(lat) else None
        vs_zero = statistics.median(a / b for a, b in zip(times[key], times[zero_key])) if zero_key else None
        rows.append({"where": name, "inflight": inflight, "median_s": med, "all_s": times[key], "examples_per_s": examples / med,
                     "vs_local": med / local, "vs_zero_ms_proxy": vs_zero, "reader_cpu_s": cpu, "server_cpu_s": server_cpu})
    print(f"| where | block reads in flight | s / epoch (median of {args.rounds}) | examples/s | x local | x 0 ms proxy (median of rounds) | reader CPU s | S3 server + proxies CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        vs_zero = f"{row['vs_zero_ms_proxy']:.2f}" if row["vs_zero_ms_proxy"] is not None else "-"
        print(f"| {row['where']} | {row['inflight']} | {row['median_s']:.2f} | {row['examples_per_s']:,.0f} | {row['vs_local']:.2f} "
              f"| {vs_zero} | {row['reader_cpu_s']:.2f} | {row['server_cpu_s']:.2f} |")
    print("\n| RAM mode: load the whole split once | s (median) | x local |\n|---|---|---|")
    ram_local = statistics.median(ram_times["local disk"])
    for name, values in ram_times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / ram_local:.2f} |")
    print(f"\n{examples} examples, {uploaded / 1e6:.0f} MB in the bucket; load average (1/5/15 min) per round: "
          + "; ".join("/".join(f"{x:.1f}" for x in l) for l in load))
    if args.json:
        args.json.write_text(json.dumps({"examples": examples, "uploaded_bytes": uploaded, "latency_ms": args.latency_ms, "rows": rows, "ram_load_s": ram_times, "load": load}, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
