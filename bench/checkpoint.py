"""Checkpoint benchmark, in one run:

* throughput of a keyed aggregation (sum, count) over 1M and over 4M distinct keys (about 23
  and 90 MB of state), checkpoints off and every 1 s, in interleaved pairs (off, then on); the
  cost of checkpoints is the median of the pairs' costs (each pair's is in the JSON), the
  rates the best of each;
* recovery: a job whose aggregation holds ~100 MB of state (4M keys) is SIGKILLed in an
  aggregate worker once a checkpoint is committed; the time from the kill until every worker
  of the restarted job has restored its state and runs again;
* checkpoints under backpressure: source -> map -> a slow sink (about 1M rows/s, 16 MB/s:
  some 8 ms per 8192-row batch), both rings (4 MiB each) full; the duration of each
  checkpoint (trigger to committed), aligned against unaligned (``unaligned_checkpoints=True``:
  barriers overtake the records in the rings), and against checkpoints that start aligned and
  turn unaligned after 50 ms (``aligned_checkpoint_timeout=0.05``).

    python bench/checkpoint.py [--quick]     # --quick: shorter jobs, under 90 s

The last line is one JSON object.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import psutil
from transport import machine_line, quick_option

from mpstream import Batch
from mpstream.checkpoint import CheckpointStore
from mpstream.pipeline import Pipeline

BATCH = 65_536
#: Pairs of runs (checkpoints off, then every 1 s) per state size: the cost is the median of
#: the pairs' costs, since one pair on this shared-host VM can be off by several points.
ROUNDS, ROUNDS_QUICK = 5, 3


_POOL: dict[int, list[Batch]] = {}  # per worker process: 16 batches, cycled deterministically


def events(keys: int, batches: int, until=None):
    """batches per instance; with an event ``until``, more until it is set (at most 50x)."""
    def gen(instance, offset):
        if offset >= batches and (until is None or until.is_set() or offset >= 50 * batches):
            return None
        if keys not in _POOL:
            rngs = [np.random.default_rng([keys, i]) for i in range(16)]
            _POOL[keys] = [Batch({"key": r.integers(0, keys, BATCH), "value": r.standard_normal(BATCH)}) for r in rngs]
        pooled = _POOL[keys][(instance * 7 + offset) % 16]  # keys shifted per offset: all keys occur
        return Batch({"key": (pooled["key"] + offset * 104_729) % keys, "value": pooled["value"]})
    return gen


def job(keys: int, batches: int, until=None) -> Pipeline:
    p = Pipeline()
    (p.from_generator("src", events(keys, batches, until), parallelism=2)
      .key_by("key").aggregate("agg", {"value": "sum", "*": "count"}, parallelism=2)
      .to_callback("sink", lambda b: None))
    return p


def throughput(batches: int, interval: float | None, keys: int = 1_000_000) -> tuple[float, list]:
    with tempfile.TemporaryDirectory(prefix="mps-bench-chk-") as directory:  # removed whatever happens
        options = {} if interval is None else {"checkpoint_dir": directory, "checkpoint_interval": interval}
        result = job(keys, batches).run(**options)
    return 2 * batches * BATCH / result.seconds, result.checkpoints


STATE_BYTES = 90 << 20  # kill once a committed checkpoint holds about this much


def recovery(batches: int, keys: int) -> tuple[float, float]:
    """(seconds from SIGKILL to every worker running again, MB of the checkpoint restored)."""
    with tempfile.TemporaryDirectory(prefix="mps-bench-rec-") as directory:  # removed whatever happens
        return _recovery(batches, keys, directory)


def _recovery(batches: int, keys: int, directory: str) -> tuple[float, float]:
    store = CheckpointStore(directory)
    killed_at: list[float] = []
    restored_bytes: list[int] = []
    done = threading.Event()
    killed = multiprocessing.get_context("fork").Event()  # the sources run on until the kill

    def big_enough():
        return any(store.metadata(n)["stats"]["bytes"] >= STATE_BYTES for n in store.complete())

    def killer():
        while not big_enough():
            if done.wait(0.01):  # polling the directory for a large enough commit
                return
        workers = [c for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE]
        restored_bytes.append(store.metadata(store.complete()[-1])["stats"]["bytes"])  # what the restart reads
        killed_at.append(time.monotonic())
        os.kill(workers[len(workers) // 2].pid, signal.SIGKILL)  # an aggregate (sources come first)
        killed.set()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = job(keys, batches, killed).run(checkpoint_dir=directory, checkpoint_interval=0.5,
                                                    restart_backoff=0.0)
    finally:
        done.set()
        thread.join()
    if not killed_at:
        raise RuntimeError("the job ended before a large enough checkpoint: give it more batches")
    state_mb = restored_bytes[0] / 2**20
    restored = [t for t in result.running_at if t > killed_at[0]]
    return restored[0] - killed_at[0], state_mb


BACKPRESSURE_BATCH = 8192


SLOW_SINK_CPU_S = 0.008


def slow_sink(batch: Batch) -> None:
    """8 ms of CPU per 8192-row batch, on any CPU: it sorts the batch's values until its
    thread has used that much CPU time (a fixed number of sorts took 8 ms on one host and
    under 1 ms on an AVX-512 one, where the rings never filled). The job runs at its pace."""
    until = time.thread_time() + SLOW_SINK_CPU_S
    while time.thread_time() < until:
        np.sort(batch["value"])


#: the checkpoint options of each mode of the backpressured job
BACKPRESSURE_MODES = {
    "aligned": {},
    "unaligned": {"unaligned_checkpoints": True},
    "aligned_for_50ms": {"unaligned_checkpoints": True, "aligned_checkpoint_timeout": 0.05},
}


def backpressured(mode: str, batches: int) -> list[float]:
    """Durations (s) of the checkpoints (every 0.2 s) of source -> map -> slow sink, with the
    options of BACKPRESSURE_MODES[mode]."""
    def gen(instance, offset):
        if offset >= batches:
            return None
        rng = np.random.default_rng(offset)
        return {"key": rng.integers(0, 1000, BACKPRESSURE_BATCH), "value": rng.standard_normal(BACKPRESSURE_BATCH)}

    p = Pipeline()
    (p.from_generator("src", gen).map("scale", lambda b: {"key": b["key"], "value": b["value"] * 2}, chain=False)
      .to_callback("slow", slow_sink, chain=False))
    with tempfile.TemporaryDirectory(prefix="mps-bench-bp-") as directory:
        result = p.run(checkpoint_dir=directory, checkpoint_interval=0.2, **BACKPRESSURE_MODES[mode])
    return [c["duration_s"] for c in result.checkpoints[:-1]]  # not the final one: nothing is in flight then


def main() -> None:
    quick = quick_option(__doc__, "shorter jobs: under 90 s")
    batches = 1000 if quick else 3000
    runs = {keys: {"off": [], "on": [], "checkpoints": []} for keys in (1_000_000, 4_000_000)}
    for _ in range(ROUNDS_QUICK if quick else ROUNDS):  # interleaved pairs: off then on, on the same machine
        for keys, run in runs.items():
            run["off"].append(throughput(batches, None, keys)[0])
            rate, taken = throughput(batches, 1.0, keys)
            if rate >= max(run["on"], default=0.0):
                run["checkpoints"] = taken
            run["on"].append(rate)
    for run in runs.values():
        run["costs"] = [1 - on / off for off, on in zip(run["off"], run["on"])]  # one per pair
        run["cost"] = float(np.median(run["costs"]))
    off, on, checkpoints = max(runs[1_000_000]["off"]), max(runs[1_000_000]["on"]), runs[1_000_000]["checkpoints"]
    cost = runs[1_000_000]["cost"]
    big = runs[4_000_000]
    big_mb = max((c["bytes"] for c in big["checkpoints"]), default=0) / 2**20
    recoveries, state_mb = [], 0.0
    for _ in range(2 if quick else 4):
        seconds, state_mb = recovery(batches=400 if quick else 600, keys=4_000_000)
        recoveries.append(seconds)
        print(f"  recovery {seconds:.3f} s with {state_mb:.0f} MB of checkpointed state", file=sys.stderr)
    durations: dict[str, list[float]] = {mode: [] for mode in BACKPRESSURE_MODES}
    for _ in range(1 if quick else 2):  # interleaved
        for mode in durations:
            durations[mode] += backpressured(mode, batches=150 if quick else 300)
    backpressured_s = {mode: float(np.median(d)) for mode, d in durations.items()}
    print(f"machine: {machine_line()}")
    print(f"keyed aggregation, 1M keys, {2 * batches * BATCH:,} events: best checkpoints off {off / 1e6:.2f} M ev/s, "
          f"best every 1 s {on / 1e6:.2f} M ev/s ({len(checkpoints)} checkpoints): cost {cost * 100:.1f}% "
          f"(median of pairs {', '.join(f'{c * 100:.1f}%' for c in runs[1_000_000]['costs'])})")
    print(f"keyed aggregation, 4M keys ({big_mb:.0f} MB checkpoints): best checkpoints off {max(big['off']) / 1e6:.2f} "
          f"M ev/s, best every 1 s {max(big['on']) / 1e6:.2f} M ev/s ({len(big['checkpoints'])} checkpoints): "
          f"cost {big['cost'] * 100:.1f}% (median of pairs {', '.join(f'{c * 100:.1f}%' for c in big['costs'])})")
    for c in checkpoints + big["checkpoints"]:
        print(f"  checkpoint {c['id']}: {c['duration_s'] * 1e3:.0f} ms, alignment {c['alignment_s'] * 1e3:.1f} ms, "
              f"pause {c['snapshot_s'] * 1e3:.1f} ms, {c['bytes'] / 2**20:.1f} MB")
    print(f"recovery from SIGKILL to running again, {state_mb:.0f} MB state: p50 {np.median(recoveries):.3f} s, "
          f"max {max(recoveries):.3f} s")
    for mode, taken in durations.items():
        print(f"checkpoint under backpressure (source -> map -> slow sink, full rings), {mode}: median "
              f"{backpressured_s[mode] * 1e3:.1f} ms over {len(taken)} checkpoints (max {max(taken) * 1e3:.1f} ms)")
    print(f"  unaligned / aligned: {backpressured_s['unaligned'] / backpressured_s['aligned']:.3f} (target <= 0.1)")
    print(json.dumps({"bench": "checkpoint", "machine": machine_line(),
                      "events_per_s": {"off": round(off), "interval_1s": round(on), "cost": round(cost, 4),
                                       "cost_pairs": [round(c, 4) for c in runs[1_000_000]["costs"]]},
                      "events_per_s_90mb": {"off": round(max(big["off"])), "interval_1s": round(max(big["on"])),
                                            "state_mb": round(big_mb, 1), "cost": round(big["cost"], 4),
                                            "cost_pairs": [round(c, 4) for c in big["costs"]]},
                      "recovery_s": {"p50": round(float(np.median(recoveries)), 4), "max": round(max(recoveries), 4)},
                      "state_mb": round(state_mb, 1), "checkpoints": checkpoints,
                      "backpressured_checkpoint_s": {mode: round(v, 4) for mode, v in backpressured_s.items()}}))


if __name__ == "__main__":
    main()
