"""The demo job: a click stream with one hot domain, aggregated per domain on all cores.

    source "clicks" (synthetic; ~90% of events on one domain)
      -> map "parse"   (derives kilobytes from the raw bytes)
      -> filter "valid" (drops server errors and bot traffic)
      -> aggregate "per_domain" by domain, salted two-stage (combine, partial, then final)
      -> file sink "csv" (one CSV per instance; transactional with checkpoints) and collect
         sink "check"

Bounded (``--events N``), the result is checked against a single-process numpy computation
over the same events. With ``--checkpoint-interval`` / ``--kill-workers`` it checkpoints,
SIGKILLs random workers at random moments, recovers, and must still verify.

Unbounded (``--unbounded``, optionally ``--rate N`` events/s per source instance), the
aggregate emits the domains that changed every second and before every checkpoint (an upsert
stream), and the job runs until SIGTERM stops it with a final checkpoint (or Ctrl-C kills it).
It then checks the published CSV files, newest row per domain, against numpy over exactly the
events the sources consumed: their positions at the final checkpoint. ``--resume`` goes on from
there, and its check covers the output of every run together.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batch import Batch, StringColumn
from .pipeline import Pipeline
from .result import JobResult
from .sources import OffsetSource
from .testing import RandomKiller

HOT_DOMAIN = "hot.example.com"
COLD_DOMAINS = 999
HOT_SHARE = 0.9
SPEC = {"bytes": ["sum", "max"], "kb": "mean", "*": "count"}
UPDATE_INTERVAL_S = 1.0  # unbounded: how often changed domains are emitted


def vocabulary() -> StringColumn:
    """Domain i of the click stream: 0 is the hot one."""
    return StringColumn.from_strings([HOT_DOMAIN] + [f"site-{i:03d}.example.org" for i in range(COLD_DOMAINS)])


def domain_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    hot = rng.random(n) < HOT_SHARE
    return np.where(hot, 0, rng.integers(1, COLD_DOMAINS + 1, n))


@dataclass(frozen=True)
class DemoOptions:
    """What ``mpstream demo`` was asked for (see ``mpstream demo --help``)."""

    events: int = 10_000_000
    parallelism: int = 2
    salt: int = 4
    batch_size: int = 65536
    out: str | None = None
    json: bool = False
    checkpoint_interval: float | None = None
    kill_workers: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    unbounded: bool = False
    rate: int | None = None

    @property
    def checkpointing(self) -> bool:
        return (self.unbounded or self.checkpoint_interval is not None or self.kill_workers > 0
                or self.checkpoint_dir is not None)


class ClickStream:
    """Batch ``offset`` of source instance ``instance``: deterministic, so replayable.
    ``events`` None: unbounded (every batch has ``batch_size`` rows)."""

    def __init__(self, events: int | None, parallelism: int, batch_size: int, seed: int = 7) -> None:
        self.events, self.parallelism, self.batch_size, self.seed = events, parallelism, batch_size, seed
        self.domains = vocabulary()

    def rows(self, instance: int, offset: int) -> int:
        if self.events is None:
            return self.batch_size
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

    def batch(self, instance: int, offset: int) -> Batch | None:
        raw = self.raw(instance, offset)
        if raw is None:
            return None
        ids = raw.pop("domain_id")
        return Batch({"domain": self.domains.take(ids), **raw})


class ClickSource(OffsetSource):
    """Reads a :class:`ClickStream` by offset; with ``rate``, at most that many events a
    second (a batch goes out when its share of time has come)."""

    def __init__(self, stream: ClickStream, rate: int | None = None) -> None:
        self.stream, self.rate = stream, rate

    def open(self, ctx: Any) -> None:
        super().open(ctx)
        self.due = time.time()

    def read(self, offset: int) -> Batch | None:
        return self.stream.batch(self.ctx.instance, offset)

    def poll(self) -> Batch | None:
        if self.rate is not None:
            now = time.time()
            if now < self.due:
                return None
            self.due = max(self.due, now - 1.0) + self.stream.rows(self.ctx.instance, self.offset) / self.rate
        return super().poll()

    def next_awake(self) -> float | None:
        return self.due if self.rate is not None else None


def parse(batch: Batch) -> dict[str, Any]:
    return {"domain": batch["domain"], "user_id": batch["user_id"], "bytes": batch["bytes"],
            "kb": batch["bytes"] / 1024.0, "status": batch["status"]}


def valid(batch: Batch) -> np.ndarray:
    return (batch["status"] < 500) & (batch["user_id"] >= 0)


def build(stream: ClickStream, options: DemoOptions, out_dir: str) -> Pipeline:
    p = Pipeline()
    per_domain = (p.source("clicks", lambda: ClickSource(stream, options.rate), options.parallelism)
                  .map("parse", parse)
                  .filter("valid", valid)
                  .key_by("domain").aggregate("per_domain", SPEC, salt=options.salt,
                                              emit="updates" if options.unbounded else "final",
                                              update_interval=UPDATE_INTERVAL_S))
    per_domain.to_files("csv", out_dir, transactional=options.checkpointing)
    per_domain.collect("check")
    return p


def reference(stream: ClickStream, offsets: list[int] | None = None) -> dict[str, tuple[int, int, int]]:
    """domain -> (bytes sum, bytes max, count) of every event (or of the batches before each
    instance's offset), computed in this process with numpy."""
    sums = np.zeros(COLD_DOMAINS + 1, np.int64)
    maxs = np.zeros(COLD_DOMAINS + 1, np.int64)
    counts = np.zeros(COLD_DOMAINS + 1, np.int64)
    for instance in range(stream.parallelism):
        offset = 0
        while (offsets is None or offset < offsets[instance]) and (raw := stream.raw(instance, offset)) is not None:
            keep = (raw["status"] < 500) & (raw["user_id"] >= 0)
            ids, b = raw["domain_id"][keep], raw["bytes"][keep]
            np.add.at(sums, ids, b)
            np.maximum.at(maxs, ids, b)
            counts += np.bincount(ids, minlength=len(counts))
            offset += 1
    names = list(vocabulary())
    return {names[i]: (int(sums[i]), int(maxs[i]), int(counts[i])) for i in np.flatnonzero(counts)}


def _matches(rows: dict[str, tuple[int, int, float, int]], want: dict[str, tuple[int, int, int]]) -> bool:
    """rows: domain -> (bytes sum, bytes max, kb mean, count)."""
    if {d: (s, m, c) for d, (s, m, _, c) in rows.items()} != want:
        return False
    return all(np.isclose(mean, want[d][0] / 1024.0 / want[d][2]) for d, (_, _, mean, _) in rows.items())


def verify(result: Batch, want: dict[str, tuple[int, int, int]]) -> bool:
    """A bounded run: the collected rows, one per domain."""
    if result.num_rows == 0:
        return not want
    rows = {d: (int(s), int(m), float(k), int(c)) for d, s, m, k, c in
            zip(result["domain"].to_numpy().tolist(), result["bytes_sum"], result["bytes_max"], result["kb_mean"],
                result["count"])}
    return _matches(rows, want)


def verify_published(out_dir: str, want: dict[str, tuple[int, int, int]]) -> bool:
    """An unbounded run: the newest row per domain of every published CSV file (epochs in
    order: the files of earlier runs first)."""
    files = [name for name in os.listdir(out_dir) if name.endswith(".csv")]
    rows: dict[str, tuple[int, int, float, int]] = {}
    for name in sorted(files, key=lambda n: int(n.rsplit(".", 2)[1])):
        with open(os.path.join(out_dir, name), newline="") as f:
            for r in csv.DictReader(f):
                rows[r["domain"]] = (int(r["bytes_sum"]), int(r["bytes_max"]), float(r["kb_mean"]), int(r["count"]))
    return _matches(rows, want)


class ProgressBar:
    def __init__(self, total: int | None) -> None:
        self.total = total

    def __call__(self, info: dict[str, Any]) -> None:
        rate = info["rows"] / max(info["seconds"], 1e-9)
        if self.total is None:
            sys.stderr.write(f"\r{info['rows']:>14,} events {rate / 1e6:8.3f} M/s (SIGTERM: stop with a checkpoint)")
        else:
            done, width = min(info["rows"], self.total), 30
            filled = int(width * done / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {done:>12,} / {self.total:,} events "
                             f"{rate / 1e6:6.2f} M/s")
        sys.stderr.flush()


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Runs the demo job and prints its summary; the CSV output goes to ``options.out`` (a
    temporary directory, removed at the end, when None)."""
    if options.out is not None:
        return _run_demo(options, options.out, False)
    with tempfile.TemporaryDirectory(prefix="mpstream-demo-") as temporary:  # removed whatever happens
        return _run_demo(options, temporary, True)


def _run_demo(options: DemoOptions, out_dir: str, temporary: bool) -> dict[str, Any]:
    # a rate-limited source sends 5 batches a second: each batch wakes every task it passes
    batch_size = options.batch_size if options.rate is None else min(options.batch_size, max(1, options.rate // 5))
    stream = ClickStream(None if options.unbounded else options.events, options.parallelism, batch_size)
    pipeline = build(stream, options, out_dir)
    bar = ProgressBar(None if options.unbounded else options.events) if sys.stderr.isatty() and not options.json else None
    run_options: dict[str, Any] = {}
    if options.checkpointing:
        run_options = {"checkpoint_dir": options.checkpoint_dir or os.path.join(out_dir, "checkpoints"),
                       "restarts": options.kill_workers + 3, "restart_backoff": 0.01, "resume": options.resume,
                       "checkpoint_interval": options.checkpoint_interval or (1.0 if options.unbounded else 0.2)}
    with warnings.catch_warnings(), RandomKiller(options.kill_workers) as killer:
        warnings.simplefilter("ignore")  # restarts are reported in the summary
        result = pipeline.run(progress=bar, **run_options)
    if bar:
        sys.stderr.write("\n")
    started = [p["offset"] for p in result.started_at.get("clicks", [])]  # a resumed run starts there
    before = stream.events_before(started)
    check_started = time.perf_counter()
    if options.unbounded:
        stopped_at = [p["offset"] for p in result.stopped_at["clicks"]]
        processed = stream.events_before(stopped_at) - before
        verified = verify_published(out_dir, reference(stream, stopped_at))
    else:
        processed = options.events - before
        verified = verify(result["check"], reference(stream))
    check_s = time.perf_counter() - check_started
    summary = _summary(options, result, processed, verified, temporary, out_dir, killer.kills)
    _report(options, result, summary, before, check_s)
    return summary


def _summary(options: DemoOptions, result: JobResult, processed: int, verified: bool, temporary: bool,
             out_dir: str, kills: int) -> dict[str, Any]:
    operators = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                 for name, row in result.per_operator().items()}
    summary = {"events": processed, "seconds": round(result.seconds, 3),
               "events_per_s": round(processed / result.seconds), "verified": verified,
               "parallelism": options.parallelism, "salt": options.salt,
               "output": None if temporary else out_dir, "operators": operators,
               "checkpoints": len(result.checkpoints), "kills": kills, "restarts": result.restarts,
               "recovery_seconds": [round(s, 4) for s in result.recovery_seconds]}
    if options.unbounded:
        summary["stopped_at"] = [p["offset"] for p in result.stopped_at["clicks"]]
        summary["final_checkpoint"] = result.final_checkpoint
    return summary


def _report(options: DemoOptions, result: JobResult, summary: dict[str, Any], before: int, check_s: float) -> None:
    processed, where = summary["events"], f"in {summary['output']}" if summary["output"] else \
        "not kept (pass --out DIR to keep the CSV files)"
    resumed = f" (resumed: {before:,} events were processed before)" if before else ""
    kind = " (unbounded, stopped)" if options.unbounded else ""
    print(f"mpstream demo{kind}: {processed:,} events in {result.seconds:.2f} s = "
          f"{processed / result.seconds / 1e6:.2f} M events/s (parallelism {options.parallelism}, salt "
          f"{options.salt}){resumed}; output {where}")
    print(f"{'operator':20s}{'inst':>5s}{'records in':>14s}{'records out':>14s}{'busy s':>9s}{'idle s':>9s}{'backpr. s':>10s}")
    for name, row in summary["operators"].items():
        print(f"{name:20s}{row['instances']:>5d}{row['records_in']:>14,}{row['records_out']:>14,}"
              f"{row['busy_s']:>9.2f}{row['idle_s']:>9.2f}{row['backpressured_s']:>10.2f}")
    if options.checkpointing:
        print(f"{summary['checkpoints']} checkpoints; {summary['kills']} workers killed, {summary['restarts']} restarts, "
              f"recovery s: {summary['recovery_seconds']}")
    if options.unbounded:
        print(f"sources stopped at offsets {summary['stopped_at']}; final checkpoint {summary['final_checkpoint']} "
              f"(resume with --resume and the same options)")
    what = "the published CSV files (newest row per domain)" if options.unbounded else "the result"
    print(f"{what} {'VERIFIED' if summary['verified'] else 'DO NOT MATCH' if options.unbounded else 'DOES NOT MATCH'} "
          f"against a single-process numpy computation ({check_s:.2f} s)")
    if options.json:
        print(json.dumps(summary))
