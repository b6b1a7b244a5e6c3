"""The demo job: a click stream with one hot domain, aggregated per domain on all cores.

    source "clicks" (synthetic; ~90% of events on one domain)
      -> map "parse"   (derives kilobytes from the raw bytes)
      -> filter "valid" (drops server errors and bot traffic)
      -> aggregate "per_domain" by domain, salted two-stage (partial, then final)
      -> file sink "csv" (one CSV per instance; transactional with checkpoints) and collect
         sink "check"

The result is checked against a single-process numpy computation over the same events. With
``--checkpoint-interval`` / ``--kill-workers`` it checkpoints, SIGKILLs random workers at random
moments, recovers, and must still verify.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

from .batch import Batch, StringColumn
from .pipeline import Pipeline
from .testing import RandomKiller

HOT_DOMAIN = "hot.example.com"
COLD_DOMAINS = 999
HOT_SHARE = 0.9


def vocabulary() -> StringColumn:
    """Domain i of the click stream: 0 is the hot one."""
    return StringColumn.from_strings([HOT_DOMAIN] + [f"site-{i:03d}.example.org" for i in range(COLD_DOMAINS)])


def domain_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    hot = rng.random(n) < HOT_SHARE
    return np.where(hot, 0, rng.integers(1, COLD_DOMAINS + 1, n))


class ClickStream:
    """Batch ``offset`` of source instance ``instance``: deterministic, so replayable."""

    def __init__(self, events: int, parallelism: int, batch_size: int, seed: int = 7) -> None:
        self.events, self.parallelism, self.batch_size, self.seed = events, parallelism, batch_size, seed
        self.domains = vocabulary()

    def rows(self, instance: int, offset: int) -> int:
        share = self.events * (instance + 1) // self.parallelism - self.events * instance // self.parallelism
        return max(0, min(self.batch_size, share - offset * self.batch_size))

    def raw(self, instance: int, offset: int) -> dict[str, Any] | None:
        """The columns of a batch; offset 0 of an instance without events has no rows (its
        schema still flows through the job); None after the last batch."""
        n = self.rows(instance, offset)
        if n == 0 and offset > 0:
            return None
        rng = np.random.default_rng([self.seed, instance, offset])
        return {
            "domain_id": domain_ids(rng, n),
            "user_id": rng.integers(-50, 1_000_000, n),  # negative ids: bots
            "bytes": rng.integers(0, 1 << 20, n),
            "status": rng.choice(np.array([200, 200, 200, 304, 404, 500]), n),
            "ts": np.datetime64("2026-11-24T00:00:00", "ms") + rng.integers(0, 86_400_000, n).astype("timedelta64[ms]"),
        }

    def events_before(self, offsets: list[int]) -> int:
        """Events in the batches before each instance's offset."""
        return sum(sum(self.rows(i, o) for o in range(offset)) for i, offset in enumerate(offsets))

    def __call__(self, instance: int, offset: int) -> Batch | None:
        raw = self.raw(instance, offset)
        if raw is None:
            return None
        ids = raw.pop("domain_id")
        return Batch({"domain": self.domains.take(ids), **raw})


def parse(batch: Batch) -> dict[str, Any]:
    return {"domain": batch["domain"], "user_id": batch["user_id"], "bytes": batch["bytes"],
            "kb": batch["bytes"] / 1024.0, "status": batch["status"]}


def valid(batch: Batch) -> np.ndarray:
    return (batch["status"] < 500) & (batch["user_id"] >= 0)


SPEC = {"bytes": ["sum", "max"], "kb": "mean", "*": "count"}


def build(stream: ClickStream, parallelism: int, salt: int, out_dir: str, transactional: bool = False) -> Pipeline:
    p = Pipeline()
    per_domain = (p.from_generator("clicks", stream, parallelism=parallelism)
                  .map("parse", parse)
                  .filter("valid", valid)
                  .key_by("domain").aggregate("per_domain", SPEC, salt=salt))
    per_domain.to_files("csv", out_dir, transactional=transactional)
    per_domain.collect("check")
    return p


def reference(stream: ClickStream) -> dict[str, tuple[int, int, int]]:
    """domain -> (bytes sum, bytes max, count), computed in this process with numpy."""
    sums = np.zeros(COLD_DOMAINS + 1, np.int64)
    maxs = np.zeros(COLD_DOMAINS + 1, np.int64)
    counts = np.zeros(COLD_DOMAINS + 1, np.int64)
    for instance in range(stream.parallelism):
        offset = 0
        while (raw := stream.raw(instance, offset)) is not None:
            keep = (raw["status"] < 500) & (raw["user_id"] >= 0)
            ids, b = raw["domain_id"][keep], raw["bytes"][keep]
            np.add.at(sums, ids, b)
            np.maximum.at(maxs, ids, b)
            counts += np.bincount(ids, minlength=len(counts))
            offset += 1
    names = list(vocabulary())
    return {names[i]: (int(sums[i]), int(maxs[i]), int(counts[i])) for i in np.flatnonzero(counts)}


def verify(result: Batch, want: dict[str, tuple[int, int, int]]) -> bool:
    if result.num_rows == 0:
        return not want
    domains = result["domain"].to_numpy().tolist()
    got = {d: (int(s), int(m), int(c)) for d, s, m, c in
           zip(domains, result["bytes_sum"], result["bytes_max"], result["count"])}
    means_ok = np.allclose(result["kb_mean"], [want[d][0] / 1024.0 / want[d][2] for d in domains])
    return got == want and means_ok


class ProgressBar:
    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, info: dict[str, Any]) -> None:
        done = min(info["rows"], self.total)
        width = 30
        filled = int(width * done / max(1, self.total))
        rate = done / max(info["seconds"], 1e-9)
        sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {done:>12,} / {self.total:,} events "
                         f"{rate / 1e6:6.2f} M/s")
        sys.stderr.flush()


def run_demo(events: int, parallelism: int, salt: int, batch_size: int, out_dir: str | None,
             as_json: bool, checkpoint_interval: float | None = None, kill_workers: int = 0,
             checkpoint_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Runs the demo job and prints its summary; the CSV output goes to out_dir (a temporary
    directory, removed at the end, when None)."""
    if out_dir is not None:
        return _run_demo(events, parallelism, salt, batch_size, out_dir, False, as_json, checkpoint_interval,
                         kill_workers, checkpoint_dir, resume)
    with tempfile.TemporaryDirectory(prefix="mpstream-demo-") as temporary:  # removed whatever happens
        return _run_demo(events, parallelism, salt, batch_size, temporary, True, as_json, checkpoint_interval,
                         kill_workers, checkpoint_dir, resume)


def _run_demo(events: int, parallelism: int, salt: int, batch_size: int, out_dir: str, temporary: bool,
              as_json: bool, checkpoint_interval: float | None, kill_workers: int, checkpoint_dir: str | None,
              resume: bool) -> dict[str, Any]:
    stream = ClickStream(events, parallelism, batch_size)
    checkpointing = checkpoint_interval is not None or kill_workers > 0 or checkpoint_dir is not None
    pipeline = build(stream, parallelism, salt, out_dir, transactional=checkpointing)
    bar = ProgressBar(events) if sys.stderr.isatty() and not as_json else None
    options: dict[str, Any] = {}
    if checkpointing:
        checkpoint_dir = checkpoint_dir or os.path.join(out_dir, "checkpoints")
        options = {"checkpoint_dir": checkpoint_dir, "restarts": kill_workers + 3,
                   "checkpoint_interval": checkpoint_interval or 0.2, "restart_backoff": 0.01, "resume": resume}
    with warnings.catch_warnings(), RandomKiller(kill_workers) as killer:
        warnings.simplefilter("ignore")  # restarts are reported in the summary
        result = pipeline.run(progress=bar, **options)
    if bar:
        sys.stderr.write("\n")
    before = stream.events_before([p["offset"] for p in result.started_at.get("clicks", [])])  # a resumed run
    processed = events - before
    started = time.perf_counter()
    verified = verify(result["check"], reference(stream))
    check_s = time.perf_counter() - started
    operators = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                 for name, row in result.per_operator().items()}
    rate = processed / result.seconds
    where = "not kept (pass --out DIR to keep the CSV files)" if temporary else f"in {out_dir}"
    summary = {"events": processed, "seconds": round(result.seconds, 3), "events_per_s": round(rate),
               "verified": verified, "parallelism": parallelism, "salt": salt,
               "output": None if temporary else out_dir, "operators": operators,
               "checkpoints": len(result.checkpoints), "kills": killer.kills, "restarts": result.restarts,
               "recovery_seconds": [round(s, 4) for s in result.recovery_seconds]}
    resumed = f" (resumed: {before:,} events of {events:,} were processed before)" if before else ""
    print(f"mpstream demo: {processed:,} events in {result.seconds:.2f} s = {rate / 1e6:.2f} M events/s "
          f"(parallelism {parallelism}, salt {salt}){resumed}; output {where}")
    print(f"{'operator':20s}{'inst':>5s}{'records in':>14s}{'records out':>14s}{'busy s':>9s}{'idle s':>9s}{'backpr. s':>10s}")
    for name, row in operators.items():
        print(f"{name:20s}{row['instances']:>5d}{row['records_in']:>14,}{row['records_out']:>14,}"
              f"{row['busy_s']:>9.2f}{row['idle_s']:>9.2f}{row['backpressured_s']:>10.2f}")
    if checkpointing:
        print(f"{len(result.checkpoints)} checkpoints; {killer.kills} workers killed, {result.restarts} restarts, "
              f"recovery s: {summary['recovery_seconds']}")
    print(f"result {'VERIFIED' if verified else 'DOES NOT MATCH'} against a single-process numpy computation "
          f"({check_s:.2f} s)")
    if as_json:
        print(json.dumps(summary))
    return summary
