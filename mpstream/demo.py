"""The demo job: a click stream with one hot domain, aggregated per domain on all cores.

    source "clicks" (synthetic; ~90% of events on one domain)
      -> map "parse"   (derives kilobytes from the raw bytes)
      -> filter "valid" (drops server errors and bot traffic)
      -> aggregate "per_domain" by domain, two-stage (a combine chained to each source, then final)
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

Event time (``--event-time``), the clicks carry timestamps out of order: each is up to
``DISORDER_MS`` before its place in the stream, and a share ``STRAGGLER_SHARE`` of stragglers
come 1-5 minutes later still. Sources make watermarks with that bound; per domain, 1-minute
tumbling windows count the clicks and sum their bytes (salted, with ``LATENESS_MS`` of allowed
lateness); clicks later than that go to a late side output. The check replays the same rules
in numpy: the late side output and the last pane of each window exactly, and the panes of each
window consistent (at most one ``on_time`` pane, holding at least the clicks that came before
their own source's watermark passed the window; ``late`` panes accumulating after it).
"""

from __future__ import annotations

import csv
import json
import os
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
from .windows import Tumbling

HOT_DOMAIN = "hot.example.com"
COLD_DOMAINS = 999
HOT_SHARE = 0.9
SPEC = {"bytes": ["sum", "max"], "kb": "mean", "*": "count"}
UPDATE_INTERVAL_S = 1.0  # unbounded: how often changed domains are emitted
START_MS = int(np.datetime64("2026-11-24T00:00:00", "ms").astype(np.int64))

# --event-time
EVENT_RATE = 10_000  # events per second of event time, all source instances together
DISORDER_MS = 5_000  # the bound of the out-of-orderness (the watermark strategy's)
STRAGGLER_SHARE = 0.002  # clicks that come later than that bound,
STRAGGLER_DELAY_MS = (60_000, 300_000)  # by this much more
WINDOW_MS = 60_000
LATENESS_MS = 60_000
WINDOW_SPEC = {"bytes": "sum", "*": "count"}


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
    unaligned_checkpoints: bool = False
    aligned_checkpoint_timeout: float | None = None
    kill_workers: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    unbounded: bool = False
    rate: int | None = None
    event_time: bool = False
    metrics_port: int | None = None

    @property
    def checkpointing(self) -> bool:
        return (self.unbounded or self.checkpoint_interval is not None or self.kill_workers > 0
                or self.checkpoint_dir is not None or self.unaligned_checkpoints)


class ClickStream:
    """Batch ``offset`` of source instance ``instance``: deterministic, so replayable.
    ``events`` None: unbounded (every batch has ``batch_size`` rows)."""

    def __init__(self, events: int | None, parallelism: int, batch_size: int, seed: int = 7,
                 event_time: bool = False) -> None:
        self.events, self.parallelism, self.batch_size, self.seed = events, parallelism, batch_size, seed
        self.event_time = event_time
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
        raw = {
            "domain_id": domain_ids(rng, n),
            "user_id": rng.integers(-50, 1_000_000, n),  # negative ids: bots
            "bytes": rng.integers(0, 1 << 20, n),
            "status": rng.choice(np.array([200, 200, 200, 304, 404, 500]), n),
        }
        if self.event_time:
            ms = START_MS + self.nominal_ms(instance, offset, n) - rng.integers(0, DISORDER_MS + 1, n)
            stragglers = rng.random(n) < STRAGGLER_SHARE
            ms[stragglers] -= rng.integers(*STRAGGLER_DELAY_MS, int(stragglers.sum()))
        else:
            ms = START_MS + rng.integers(0, 86_400_000, n)
        return {**raw, "ts": ms.astype("datetime64[ms]")}

    def nominal_ms(self, instance: int, offset: int, n: int) -> np.ndarray:
        """Where rows of a batch stand in event time: the instances interleave, ``EVENT_RATE``
        events per second together."""
        sequence = (offset * self.batch_size + np.arange(n, dtype=np.int64)) * self.parallelism + instance
        return sequence * 1000 // EVENT_RATE

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

    def total_rows(self) -> int | None:
        return self.stream.events

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


def parse_timed(batch: Batch) -> dict[str, Any]:
    return {**parse(batch), "ts": batch["ts"]}


def build(stream: ClickStream, options: DemoOptions, out_dir: str) -> Pipeline:
    p = Pipeline(name="demo")
    clicks = p.source("clicks", lambda: ClickSource(stream, options.rate), options.parallelism)
    if options.event_time:
        windows = (clicks.with_event_time("ts", max_out_of_orderness=DISORDER_MS)
                   .map("parse", parse_timed)
                   .filter("valid", valid)
                   .key_by("domain").window(Tumbling(WINDOW_MS), allowed_lateness=LATENESS_MS)
                   .aggregate("per_minute", WINDOW_SPEC, salt=options.salt))
        windows.to_files("csv", out_dir, transactional=options.checkpointing)
        windows.collect("check")
        windows.late.to_files("late_csv", out_dir, transactional=options.checkpointing)
        windows.late.collect("late")
        return p
    per_domain = (clicks
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
    for name in sorted(files, key=lambda n: n.split(".")[1:3]):  # {name}-{i}.{epoch}.{part}.csv: by epoch, part
        with open(os.path.join(out_dir, name), newline="") as f:
            for r in csv.DictReader(f):
                rows[r["domain"]] = (int(r["bytes_sum"]), int(r["bytes_max"]), float(r["kb_mean"]), int(r["count"]))
    return _matches(rows, want)


@dataclass
class WindowReference:
    """What ``--event-time`` must produce, per (domain, window start): the clicks in the window
    (count, bytes) and those that came before their source's watermark passed the window (they
    are in its on-time pane); and the late clicks as sorted (domain, ts, bytes) rows."""

    counts: dict[tuple[int, int], int]
    bytes: dict[tuple[int, int], int]
    on_time: dict[tuple[int, int], int]
    late: list[tuple[int, int, int]]


def _window_keys(domain_ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(domain, window) as one int64: the window's index times 1024 plus the domain."""
    return ts // WINDOW_MS * 1024 + domain_ids


def window_reference(stream: ClickStream) -> WindowReference:
    """The rules of :mod:`mpstream.windows` in numpy, source instance by instance and batch by
    batch: a click is judged against its instance's watermark after the batches before it
    (the largest timestamp so far minus ``DISORDER_MS``)."""
    keys, clicks, sums, sure, late = [], [], [], [], []
    for instance in range(stream.parallelism):
        offset, watermark = 0, None
        while (raw := stream.raw(instance, offset)) is not None:
            all_ts = raw["ts"].astype(np.int64)
            keep = (raw["status"] < 500) & (raw["user_id"] >= 0)
            ids, b, ts = raw["domain_id"][keep], raw["bytes"][keep], all_ts[keep]
            end = ts // WINDOW_MS * WINDOW_MS + WINDOW_MS
            dropped = np.zeros(len(ts), bool) if watermark is None else end + LATENESS_MS <= watermark
            late += zip(ids[dropped].tolist(), ts[dropped].tolist(), b[dropped].tolist())
            batch_keys, inverse = np.unique(_window_keys(ids[~dropped], ts[~dropped]), return_inverse=True)
            keys.append(batch_keys)
            clicks.append(np.bincount(inverse, minlength=len(batch_keys)))
            sums.append(np.bincount(inverse, b[~dropped], minlength=len(batch_keys)))
            before = np.ones(len(ts), bool) if watermark is None else end > watermark  # the window is still open
            sure.append(np.bincount(inverse, before[~dropped], minlength=len(batch_keys)))
            if len(all_ts):
                seen = int(all_ts.max()) - DISORDER_MS
                watermark = seen if watermark is None else max(watermark, seen)
            offset += 1
    unique, inverse = np.unique(np.concatenate(keys or [np.zeros(0, np.int64)]), return_inverse=True)

    def total(parts: list[np.ndarray]) -> dict[tuple[int, int], int]:
        summed = np.bincount(inverse, np.concatenate(parts or [np.zeros(0)]), minlength=len(unique))
        return {(int(k) % 1024, int(k) // 1024 * WINDOW_MS): int(v) for k, v in zip(unique, summed)}

    return WindowReference(total(clicks), total(sums), total(sure), sorted(late))


def verify_windows(result: Batch, late: Batch, want: WindowReference) -> bool:
    """The collected window rows and late rows against the reference: late rows and the last
    pane of every window exactly; per window at most one ``on_time`` pane, holding at least
    the clicks sure to be on time, and every ``late`` pane after it with more clicks."""
    ids = {name: i for i, name in enumerate(vocabulary())}
    panes: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    if result.num_rows:
        for d, s, c, b, pane in zip(result["domain"].to_numpy().tolist(), result["window_start"].astype(np.int64),
                                    result["count"].tolist(), result["bytes_sum"].tolist(),
                                    result["pane"].to_numpy().tolist()):
            panes.setdefault((ids[d], int(s)), []).append((c, b, pane))
    got_late = [] if late.num_rows == 0 else sorted(zip(
        [ids[d] for d in late["domain"].to_numpy().tolist()], late["ts"].astype(np.int64).tolist(),
        late["bytes"].tolist()))
    if got_late != want.late or set(panes) != set(want.counts):
        return False
    for window, rows in panes.items():
        rows.sort()
        kinds = [pane for _, _, pane in rows]
        counts = [c for c, _, _ in rows]
        if kinds.count("on_time") > 1 or set(kinds) - {"on_time", "late"} or len(set(counts)) != len(counts):
            return False
        if "on_time" in kinds and kinds[0] != "on_time" or want.on_time[window] and kinds[0] != "on_time":
            return False
        if kinds[0] == "on_time" and counts[0] < want.on_time[window]:
            return False
        if rows[-1][:2] != (want.counts[window], want.bytes[window]):
            return False
    return True


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
    stream = ClickStream(None if options.unbounded else options.events, options.parallelism, batch_size,
                         event_time=options.event_time)
    pipeline = build(stream, options, out_dir)
    run_options: dict[str, Any] = {"progress": not options.json, "metrics_port": options.metrics_port}
    if options.checkpointing:
        run_options |= {"checkpoint_dir": options.checkpoint_dir or os.path.join(out_dir, "checkpoints"),
                       "restarts": options.kill_workers + 3, "restart_backoff": 0.01, "resume": options.resume,
                       "unaligned_checkpoints": options.unaligned_checkpoints,
                       "aligned_checkpoint_timeout": options.aligned_checkpoint_timeout,
                       "checkpoint_interval": options.checkpoint_interval or (1.0 if options.unbounded else 0.2)}
    with warnings.catch_warnings(), RandomKiller(options.kill_workers) as killer:
        warnings.simplefilter("ignore")  # restarts are reported in the summary
        result = pipeline.run(**run_options)
    started = [p["offset"] for p in result.started_at.get("clicks", [])]  # a resumed run starts there
    before = stream.events_before(started)
    check_started = time.perf_counter()
    if options.unbounded:
        stopped_at = [p["offset"] for p in result.stopped_at["clicks"]]
        processed = stream.events_before(stopped_at) - before
        verified = verify_published(out_dir, reference(stream, stopped_at))
    elif options.event_time:
        processed = options.events - before
        verified = verify_windows(result["check"], result["late"], window_reference(stream))
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
               "output": None if temporary else out_dir, "operators": operators, "processes": result.processes(),
               "checkpoints": len(result.checkpoints), "kills": kills, "restarts": result.restarts,
               "in_flight_rows": sum(c["in_flight_rows"] for c in result.checkpoints),
               "recovery_seconds": [round(s, 4) for s in result.recovery_seconds],
               "timeline": result.recording.to_json()}
    if options.unbounded:
        summary["stopped_at"] = [p["offset"] for p in result.stopped_at["clicks"]]
        summary["final_checkpoint"] = result.final_checkpoint
    if options.event_time:
        windows = result["check"]
        summary["windows"] = windows.num_rows
        summary["late_fired"] = int((windows["pane"].to_numpy() == "late").sum()) if windows.num_rows else 0
        summary["late_side_output"] = result["late"].num_rows
    return summary


def _report(options: DemoOptions, result: JobResult, summary: dict[str, Any], before: int, check_s: float) -> None:
    processed, where = summary["events"], f"in {summary['output']}" if summary["output"] else \
        "not kept (pass --out DIR to keep the CSV files)"
    resumed = f" (resumed: {before:,} events were processed before)" if before else ""
    kind = " (unbounded, stopped)" if options.unbounded else ""
    print(f"mpstream demo{kind}: {processed:,} events in {result.seconds:.2f} s = "
          f"{processed / result.seconds / 1e6:.2f} M events/s (parallelism {options.parallelism}, salt "
          f"{options.salt}){resumed}; output {where}")
    process_of = {name: head for head, chain in summary["processes"].items() for name in chain}
    print(f"{'operator':20s}{'in the process of':>18s}{'inst':>5s}{'records in':>14s}{'records out':>14s}"
          f"{'busy s':>9s}{'idle s':>9s}{'backpr. s':>10s}")
    for name, row in summary["operators"].items():
        head = "" if process_of.get(name, name) == name else process_of[name]
        print(f"{name:20s}{head:>18s}{row['instances']:>5d}{row['records_in']:>14,}{row['records_out']:>14,}"
              f"{row['busy_s']:>9.2f}{row['idle_s']:>9.2f}{row['backpressured_s']:>10.2f}")
    if options.checkpointing:
        print(f"{summary['checkpoints']} checkpoints; {summary['kills']} workers killed, {summary['restarts']} restarts, "
              f"recovery s: {summary['recovery_seconds']}")
    if options.unbounded:
        if not options.out:
            how = "its output was temporary and is gone: pass --out DIR --checkpoint-dir CHK to be able to resume"
        elif options.checkpoint_dir:
            how = "resume with --resume and the same options"
        else:
            how = f"resume with --resume --checkpoint-dir {os.path.join(options.out, 'checkpoints')} and the same options"
        print(f"sources stopped at offsets {summary['stopped_at']}; final checkpoint {summary['final_checkpoint']} "
              f"({how})")
    if options.event_time:
        print(f"{summary['windows']:,} window rows ({summary['late_fired']:,} late firings); "
              f"{summary['late_side_output']:,} clicks too late for their window went to the late side output")
    what = "the published CSV files (newest row per domain)" if options.unbounded else "the result"
    print(f"{what} {'VERIFIED' if summary['verified'] else 'DO NOT MATCH' if options.unbounded else 'DOES NOT MATCH'} "
          f"against a single-process numpy computation ({check_s:.2f} s)")
    if options.json:
        print(json.dumps(summary))
