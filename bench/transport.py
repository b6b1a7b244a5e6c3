"""Transport benchmark: producer process -> consumer process throughput and one-way latency,
for mpstream channels and the multiprocessing baselines, measured in the same run.

    python bench/transport.py            # full run
    python bench/transport.py --quick    # under 60 s

Throughput: the producer sends one int64 column of SIZE bytes per message, cycling through
SIZE slices of an ordinary 256 MiB numpy array (beyond the caches, not page-aligned); the
consumer touches every cache line of it. np_copyto is the single-process bandwidth of copying
SIZE chunks between two 256 MiB buffers, the same memory traffic without a second process.
Latency: ping-pong of an 8-row batch, one-way = round trip / 2; "_parked" variants pause 1 ms
between pings so the echoing side is asleep on its futex (or in the kernel) every time. Parked
pings (2,000 per implementation, 500 with --quick) come in 5 rounds, interleaved with the other
implementations' (the host drifts within a run): mpstream / pipe is the median of the rounds'
ratios of p50s, each round against the pipe's beside it. The other pings come in one run of
10,000 (2,000 with --quick) each: rounds of 2,000 measured them slower, the scheduler not yet
having put the two spinning processes on separate CPUs. Each round starts with 20 untimed
pings.
"mpstream_ring" is the same ping-pong on the same rings through the ring's own calls (claim,
commit, peek, release; a 64-byte record, no Batch and no framing): the futex wake-up alone,
without the Python record path a channel adds on each side.
Each throughput figure is the best of 5 runs (3 with --quick): this 2-vCPU VM shares its host,
and single runs vary by +-30%. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from mpstream import Batch, Channel, ChannelReader, ChannelTimeoutError, ChannelWriter, RecordKind
from mpstream._mps import ffi, lib

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20}
CAPACITY = 1 << 23
CTX = multiprocessing.get_context("fork")


def touch(arr: np.ndarray) -> int:
    """Reads one word of every 64-byte line: the consumer really pulls the data over. The
    same for every implementation; the ufunc directly, as ndarray.sum() adds ~0.7 us."""
    return int(np.add.reduce(arr[::8]))


SOURCE_BYTES = 256 << 20


def payload(nbytes: int) -> np.ndarray:
    return np.arange(nbytes // 8, dtype=np.int64)


def source_slices(nbytes: int) -> list[np.ndarray]:
    """SIZE slices (views) of one 256 MiB array: each message's bytes come from DRAM."""
    src = payload(SOURCE_BYTES)
    return [src[lo : lo + nbytes // 8] for lo in range(0, len(src), nbytes // 8)]


# ---- throughput ---------------------------------------------------------------------------

def _mps_produce(name: str, nbytes: int, count: int) -> None:
    batches = [Batch({"payload": s}) for s in source_slices(nbytes)]
    with ChannelWriter(name) as writer:
        for i in range(count):
            writer.write(batches[i % len(batches)])


def consume(messages) -> float:
    """Touches every message; returns messages per second from the first one on (when the
    producer is surely running)."""
    n, start = 0, 0.0
    for arr in messages:
        touch(arr)
        n += 1
        if n == 1:
            start = time.perf_counter()
    return (n - 1) / (time.perf_counter() - start)


def _mps_messages(reader: ChannelReader):
    while True:
        with reader.read(timeout=60) as record:  # held while the consumer touches it
            if record.kind == RecordKind.END_OF_STREAM:
                return
            yield record.batch["payload"]


def mpstream_throughput(nbytes: int, count: int) -> float:
    """Messages per second from a producer process to this one."""
    with Channel("bench-throughput", capacity=CAPACITY) as chan, ChannelReader(chan.name) as reader:
        child = CTX.Process(target=_mps_produce, args=(chan.name, nbytes, count))
        child.start()
        rate = consume(_mps_messages(reader))
        child.join()
    return rate


def _until_none(get):
    while (arr := get()) is not None:
        yield arr


def _queue_produce(queue, nbytes: int, count: int) -> None:
    slices = source_slices(nbytes)
    for i in range(count):
        queue.put(slices[i % len(slices)])
    queue.put(None)


def mp_queue_throughput(nbytes: int, count: int) -> float:
    queue = CTX.Queue(maxsize=64)
    child = CTX.Process(target=_queue_produce, args=(queue, nbytes, count))
    child.start()
    rate = consume(_until_none(queue.get))
    child.join()
    return rate


def _pipe_produce(conn, nbytes: int, count: int) -> None:
    slices = source_slices(nbytes)
    for i in range(count):
        conn.send_bytes(slices[i % len(slices)])
    conn.send_bytes(b"")


def mp_pipe_throughput(nbytes: int, count: int) -> float:
    receiver, sender = CTX.Pipe(duplex=False)
    child = CTX.Process(target=_pipe_produce, args=(sender, nbytes, count))
    child.start()
    buf = bytearray(nbytes)  # recv_bytes_into: the baseline's fastest receive path
    view = np.frombuffer(buf, np.int64)
    rate = consume(view for _ in iter(lambda: receiver.recv_bytes_into(buf), 0))
    child.join()
    return rate


def np_copyto_throughput(nbytes: int, count: int) -> float:
    """Chunks of nbytes per second copied between two 256 MiB buffers, one process."""
    words, chunk = SOURCE_BYTES // 8, nbytes // 8
    src, dst = payload(SOURCE_BYTES), np.empty(words, np.int64)
    np.copyto(dst, src)  # fault the pages in first
    start = time.perf_counter()
    for i in range(count):
        lo = (i * chunk) % (words - chunk + 1)
        np.copyto(dst[lo : lo + chunk], src[lo : lo + chunk])
    return count / (time.perf_counter() - start)


THROUGHPUT = {
    "mpstream": mpstream_throughput,
    "mp_queue": mp_queue_throughput,
    "mp_pipe": mp_pipe_throughput,
    "np_copyto": np_copyto_throughput,
}


# ---- latency ------------------------------------------------------------------------------

def _mps_echo(inbound: str, outbound: str) -> None:
    with ChannelReader(inbound) as reader, ChannelWriter(outbound) as writer:
        while True:
            with reader.read() as record:
                if record.kind == RecordKind.END_OF_STREAM:
                    return
                writer.write(record.batch)


WARMUP_PINGS = 20


def ping_pong(round_trip, pings: int, gap_s: float) -> np.ndarray:
    """One-way latencies in microseconds: each round_trip() timed and halved; gap_s of sleep
    before each ping lets the other side fall asleep first. The first WARMUP_PINGS (the
    echoing process just started) are not timed."""
    for _ in range(WARMUP_PINGS):
        round_trip()
    out = np.empty(pings)
    for i in range(pings):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter_ns()
        round_trip()
        out[i] = (time.perf_counter_ns() - t0) / 2000
    return out


def mpstream_latency(pings: int, gap_s: float) -> np.ndarray:
    """One-way latencies in microseconds."""
    with Channel("bench-ping", 1 << 16) as ping, Channel("bench-pong", 1 << 16) as pong:
        writer, reader = ChannelWriter(ping.name), ChannelReader(pong.name)
        child = CTX.Process(target=_mps_echo, args=(ping.name, pong.name))
        child.start()
        batch = Batch({"x": np.arange(8)})

        def round_trip():
            writer.write(batch)
            reader.read(timeout=10).release()

        out = ping_pong(round_trip, pings, gap_s)
        writer.close()
        child.join()
        reader.close()
    return out


RING_RECORD = 64  # bytes of a ring-level ping: an 8-row int64 column's worth


def _ring_call(rc: int) -> None:
    if rc != lib.MPS_RING_OK:
        raise RuntimeError(f"ring call failed: {rc}")


def _ring_echo(inbound: str, outbound: str) -> None:
    """Echoes each record with the ring's own calls (the channels' handles, nothing above)."""
    with ChannelReader(inbound) as reader, ChannelWriter(outbound) as writer:
        ring_in, ring_out = reader._ring, writer._ring
        record, offset = reader._peeked, writer._offset
        while True:
            _ring_call(lib.mps_ring_peek(ring_in, 10**10, record, ffi.NULL))
            if record.type == lib.MPS_RECORD_END_OF_STREAM:
                return
            _ring_call(lib.mps_ring_try_claim(ring_out, lib.MPS_RECORD_DATA, RING_RECORD, offset))
            _ring_call(lib.mps_ring_commit(ring_out))
            _ring_call(lib.mps_ring_release(ring_in))


def ring_latency(pings: int, gap_s: float) -> np.ndarray:
    """One-way latencies in microseconds, ring calls only (see the module doc)."""
    with Channel("bench-ping", 1 << 16) as ping, Channel("bench-pong", 1 << 16) as pong:
        writer, reader = ChannelWriter(ping.name), ChannelReader(pong.name)
        child = CTX.Process(target=_ring_echo, args=(ping.name, pong.name))
        child.start()
        ring_out, ring_in, record, offset = writer._ring, reader._ring, reader._peeked, writer._offset

        def round_trip():
            _ring_call(lib.mps_ring_try_claim(ring_out, lib.MPS_RECORD_DATA, RING_RECORD, offset))
            _ring_call(lib.mps_ring_commit(ring_out))
            _ring_call(lib.mps_ring_peek(ring_in, 10**10, record, ffi.NULL))
            _ring_call(lib.mps_ring_release(ring_in))

        out = ping_pong(round_trip, pings, gap_s)
        writer.close()
        child.join()
        reader.close()
    return out


def _pipe_echo(conn) -> None:
    while msg := conn.recv_bytes():
        conn.send_bytes(msg)


def mp_pipe_latency(pings: int, gap_s: float) -> np.ndarray:
    parent, child_end = CTX.Pipe()
    child = CTX.Process(target=_pipe_echo, args=(child_end,))
    child.start()
    msg = np.arange(8).tobytes()
    out = ping_pong(lambda: (parent.send_bytes(msg), parent.recv_bytes()), pings, gap_s)
    parent.send_bytes(b"")
    child.join()
    return out


# ---- idle reader --------------------------------------------------------------------------

def _blocked_reader(name: str, seconds: float, result) -> None:
    with ChannelReader(name) as reader:
        cpu0 = time.process_time()
        try:
            reader.read(timeout=seconds)
        except ChannelTimeoutError:
            pass
        result.value = time.process_time() - cpu0


def idle_reader_cpu_percent(seconds: float) -> float:
    """CPU a reader uses while blocked on an empty channel, in % of one core."""
    with Channel("bench-idle", 1 << 16) as chan, ChannelWriter(chan.name):
        result = CTX.Value("d", -1.0)
        child = CTX.Process(target=_blocked_reader, args=(chan.name, seconds, result))
        child.start()
        child.join()
        return 100 * result.value / seconds


# ---- report -------------------------------------------------------------------------------

LATENCY = {"mpstream": mpstream_latency, "mpstream_ring": ring_latency, "mp_pipe": mp_pipe_latency}
LATENCY_ROUNDS = 5  # each impl's parked pings are taken in this many rounds, interleaved with the others'


def best_of(rounds: int, jobs: dict[str, Callable[[], Any]], check: Callable[[str, Any], None]) -> dict[str, float]:
    """Each job's best time (s) over rounds, the jobs taking turns round by round (a slow spell
    of the host hits every job); check(name, result) after every run."""
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            result = job()
            best[name] = min(best[name], time.perf_counter() - start)
            check(name, result)
    return best


def quick_option(doc: str, what: str) -> bool:
    """Parses a benchmark script's command line: only ``--quick`` (``what`` it does)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=what)
    return parser.parse_args().quick


def machine_line() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}, numpy {np.__version__}")


def run(quick: bool) -> dict:
    scale = 0.25 if quick else 1.0
    repeats = 3 if quick else 5
    counts = {  # messages per measurement, per implementation speed class
        "4KiB": {"fast": 200_000, "slow": 40_000},
        "64KiB": {"fast": 40_000, "slow": 8_000},
        "1MiB": {"fast": 4_000, "slow": 600},
    }
    throughput: dict[str, dict[str, dict[str, float]]] = {}
    for impl, measure in THROUGHPUT.items():
        throughput[impl] = {}
        for size, nbytes in SIZES.items():
            count = int(counts[size]["slow" if impl.startswith("mp_") else "fast"] * scale)
            msgs = max(measure(nbytes, count) for _ in range(repeats))
            throughput[impl][size] = {"MBps": round(msgs * nbytes / 1e6, 1), "msgs_per_s": round(msgs)}
            print(f"  {impl:10s} {size:>6s} {msgs * nbytes / 1e6:10.1f} MB/s {msgs:12,.0f} msgs/s", file=sys.stderr)
    pings = 2_000 if quick else 10_000
    parked = 500 if quick else 2_000
    samples: dict[str, list[np.ndarray]] = {f"{impl}{kind}": [] for impl in LATENCY for kind in ("", "_parked")}
    for impl, measure in LATENCY.items():  # one long run each: the scheduler settles two spinning processes
        samples[impl].append(measure(pings, 0))
    for _ in range(LATENCY_ROUNDS):  # parked, interleaved: the host's drift during the run hits every impl alike
        for impl, measure in LATENCY.items():
            samples[f"{impl}_parked"].append(measure(parked // LATENCY_ROUNDS, 0.001))
    latency = {impl: dict(zip(("p50", "p99"), np.percentile(np.concatenate(s), [50, 99]).round(2).tolist()))
               for impl, s in samples.items()}
    ratios = [float(np.median(ours) / np.median(pipe))  # round by round: each against the pipe beside it
              for ours, pipe in zip(samples["mpstream_parked"], samples["mp_pipe_parked"])]
    idle = round(idle_reader_cpu_percent(5.0), 2)
    return {"bench": "transport", "machine": machine_line(), "quick": quick, "throughput": throughput,
            "latency_us": latency, "parked_p50_vs_pipe": round(float(np.median(ratios)), 3),
            "parked_p50_vs_pipe_rounds": [round(r, 3) for r in ratios], "idle_reader_cpu_percent_5s": idle}


def print_table(result: dict) -> None:
    print(f"machine: {result['machine']}")
    print(f"{'impl':12s}" + "".join(f"{size:>22s}" for size in SIZES))
    for impl, sizes in result["throughput"].items():
        cells = "".join(f"{v['MBps']:>9,.0f} MB/s {v['msgs_per_s']:>7,}/s" for v in sizes.values())
        print(f"{impl:12s}{cells}")
    t = result["throughput"]
    print(f"1MiB: mpstream / np_copyto = {t['mpstream']['1MiB']['MBps'] / t['np_copyto']['1MiB']['MBps']:.2f}x, "
          f"mpstream / mp_queue = {t['mpstream']['1MiB']['MBps'] / t['mp_queue']['1MiB']['MBps']:.1f}x")
    print(f"{'latency (one-way, us)':24s}{'p50':>8s}{'p99':>8s}")
    for impl, v in result["latency_us"].items():
        print(f"{impl:24s}{v['p50']:8.2f}{v['p99']:8.2f}")
    rounds = ", ".join(f"{r:.2f}" for r in result["parked_p50_vs_pipe_rounds"])
    print(f"parked p50, mpstream / pipe: median of the rounds {result['parked_p50_vs_pipe']:.2f} ({rounds}; target <= 1)")
    print(f"reader blocked 5 s on an empty channel: {result['idle_reader_cpu_percent_5s']:.2f}% of a core")


def main() -> None:
    quick = quick_option(__doc__, "smaller counts: finishes in under 60 s")
    result = run(quick)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
