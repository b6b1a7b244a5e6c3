"""``mpstream top``: the jobs running on this machine, per operator (or instance), refreshed
every second: records/s in and out, the busy / idle / backpressured shares of its processes,
the fill of their fullest input ring, dropped and late records, the watermark and its lag, and
the last checkpoint. It reads the jobs' counters boards (:mod:`mpstream.counters`) and never
disturbs a job.

``mpstream top --once`` prints one view and exits; ``--json`` prints it as a JSON list of jobs
with their operators. Live, ``i`` shows or hides instances and ``q`` quits.
"""

from __future__ import annotations

import curses
import json
import time
from typing import Any

from .counters import Board, JobCounters, Rates, find_boards, rates

__all__ = ["collect", "render", "main"]


def collect(interval: float, earlier: dict[str, JobCounters] | None = None,
            ) -> tuple[list[tuple[JobCounters, list[Rates]]], dict[str, JobCounters]]:
    """Each running job with its operators' rates over ``interval`` seconds (or since the
    ``earlier`` snapshots, of the previous refresh), and the snapshots taken now."""
    if earlier is None:
        earlier = {path: job for path in find_boards() if (job := Board.read(path)) is not None}
        time.sleep(interval)  # the span the rates are measured over
    now = {path: job for path in find_boards() if (job := Board.read(path)) is not None}
    jobs = []
    for path, job in now.items():
        before = earlier.get(path)
        if before is None or before.started != job.started:  # new, or a descriptor number used again
            before = _empty(job)
        jobs.append((job, rates(before, job)))
    return jobs, now


def _empty(job: JobCounters) -> JobCounters:
    """A job seen for the first time: its rates count from its start."""
    return JobCounters(job.name, job.path, job.pid, job.started, job.taken - max(time.time() - job.started, 1e-3),
                       job.state, 0, None, 0, None, [])


def _lag(watermark: int | None) -> float | None:
    """Seconds the watermark is behind now, when it reads as milliseconds since the epoch."""
    if watermark is None or not 1e12 <= watermark < 1e13:
        return None
    return round(time.time() - watermark / 1000, 3)


def _row(name: str, group: list[Rates]) -> dict[str, Any]:
    ops = [r.counters for r in group]
    watermarks = [o.watermark for o in ops if o.watermark is not None]
    watermark = min(watermarks) if len(watermarks) == len(ops) and watermarks else None
    n = len(group)
    return {"operator": name, "instances": n,
            "records_in": sum(o.records_in for o in ops), "records_out": sum(o.records_out for o in ops),
            "records_in_per_s": round(sum(r.records_in_per_s for r in group), 1),
            "records_out_per_s": round(sum(r.records_out_per_s for r in group), 1),
            "busy": round(sum(r.busy for r in group) / n, 4), "idle": round(sum(r.idle for r in group) / n, 4),
            "backpressured": round(sum(r.backpressured for r in group) / n, 4),
            "input_fill": round(max(o.input_fill for o in ops), 4),
            "dropped": sum(o.dropped for o in ops), "late": sum(o.late for o in ops),
            "watermark": watermark, "watermark_lag_s": _lag(watermark),
            "processes": sorted({o.task for o in ops})}


def to_json(jobs: list[tuple[JobCounters, list[Rates]]], instances: bool = False) -> list[dict[str, Any]]:
    """The view as JSON: one object per job, with one per operator (and per instance)."""
    out = []
    for job, group in jobs:
        by_name: dict[str, list[Rates]] = {}
        for r in group:
            by_name.setdefault(r.counters.name, []).append(r)
        operators = []
        for name, members in by_name.items():
            row = _row(name, members)
            if instances:
                row["per_instance"] = [{**_row(name, [r]), "instance": r.counters.instance, "pid": r.counters.pid,
                                        "waiting": r.counters.waiting} for r in members]
            operators.append(row)
        last = job.last_checkpoint
        out.append({**job.to_json(), "uptime_s": round(time.time() - job.started, 3),
                    "last_checkpoint": None if last is None else {
                        "id": last["id"], "age_s": round(time.time() - last["at"], 3),
                        "duration_s": round(last["duration_s"], 4)},
                    "operators": operators})
    return out


def _rate(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _count(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(value) if value < 100_000 else f"{value / 1e3:.0f}k"


def render(view: list[dict[str, Any]], instances: bool = False) -> str:
    """The view (:func:`to_json`) as text, a table per job."""
    if not view:
        return "no mpstream job is running (that this user can see)"
    lines = []
    header = (f"{'operator':<18} {'inst':>4} {'in/s':>7} {'out/s':>7} {'busy':>4} {'idle':>4} {'bp':>4} "
              f"{'fill':>4} {'drop':>6} {'late':>5} {'lag s':>5}")  # fits 80 columns
    for job in view:
        last = job["last_checkpoint"]
        checkpoint = ("no checkpoint yet" if last is None else
                      f"checkpoint {last['id']} {last['age_s']:.1f} s ago, took {last['duration_s'] * 1000:.0f} ms")
        lines.append(f"job {job['job']!r} pid {job['pid']} {job['state']} {job['uptime_s']:.0f} s, "
                     f"{job['restarts']} restarts, {checkpoint}")
        lines.append(header)
        for op in job["operators"]:
            rows = [op] + (op.get("per_instance", []) if instances else [])
            for row in rows:
                label = op["operator"] if row is op else \
                    f"  [{row['instance']}] " + (f"waits {row['waiting']}" if row["waiting"] else "")
                lag = "" if row["watermark_lag_s"] is None else f"{row['watermark_lag_s']:.1f}"
                lines.append(f"{label[:18]:<18} {row['instances']:>4} {_rate(row['records_in_per_s']):>7} "
                             f"{_rate(row['records_out_per_s']):>7} {row['busy']:>4.0%} {row['idle']:>4.0%} "
                             f"{row['backpressured']:>4.0%} {row['input_fill']:>4.0%} {_count(row['dropped']):>6} "
                             f"{_count(row['late']):>5} {lag:>5}")
        lines.append("")
    return "\n".join(lines)


def _live(screen: Any, interval: float, instances: bool) -> None:
    curses.curs_set(0)
    screen.timeout(int(interval * 1000))  # getch waits up to the refresh: no busy loop
    jobs, earlier = collect(interval)
    while True:
        text = render(to_json(jobs, instances), instances)
        screen.erase()
        height, width = screen.getmaxyx()
        lines = [time.strftime("mpstream top  %H:%M:%S   i: instances  q: quit")] + text.splitlines()
        for y, line in enumerate(lines[:height]):
            screen.addnstr(y, 0, line, width - 1)
        screen.refresh()
        key = screen.getch()  # up to the interval; a key comes sooner
        if key in (ord("q"), 27):
            return
        if key == ord("i"):
            instances = not instances
        if key == -1:  # the interval passed: rates over it (a key redraws the last view, not a shorter span)
            jobs, earlier = collect(interval, earlier)


def main(once: bool, as_json: bool, instances: bool, interval: float) -> int:
    """``mpstream top``: one view printed (``once``, ``as_json``), else a live one until ``q``."""
    if once or as_json:
        jobs, _ = collect(interval)
        view = to_json(jobs, instances)
        print(json.dumps(view) if as_json else render(view, instances))
        return 0
    try:
        curses.wrapper(_live, interval, instances)
    except KeyboardInterrupt:
        pass
    return 0
