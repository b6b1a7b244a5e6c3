"""Watching a job: the counters board, mpstream top, the Prometheus endpoint, the timeline and
its plot, and progress bars."""

import io
import json
import os
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

from mpstream import Pipeline
from mpstream.counters import find_boards
from mpstream.errors import PlanError
from mpstream.timeline import Timeline
from mpstream import top


def endless(rows_per_batch: int = 4096):
    """An unbounded source, a map chained to it, and a keyed sum in processes of its own."""
    p = Pipeline(name="watched")
    (p.from_generator("numbers", lambda i, offset: {"k": np.arange(rows_per_batch) % 7,
                                                    "v": np.ones(rows_per_batch)}, parallelism=2)
      .map("double", lambda b: {"k": b["k"], "v": b["v"] * 2})
      .key_by("k").aggregate("total", {"v": "sum"}).collect("out"))
    return p


def started(p, **run_options):
    """Starts p and returns its handle once its sources have produced rows (so every task runs)."""
    produced = threading.Event()
    job = p.start(progress=lambda info: info["rows"] and produced.set(), **run_options)
    if not produced.wait(60):
        job.cancel()
        raise AssertionError("the job produced nothing in 60 s")
    return job


def mine():
    return [path for path in find_boards() if path.startswith(f"/proc/{os.getpid()}/")]


def test_top_once_json_lists_a_running_jobs_operators_with_positive_rates_and_nothing_once_it_ended():
    job = started(endless())
    try:
        out = subprocess.run([sys.executable, "-m", "mpstream", "top", "--once", "--json", "--instances",
                              "--interval", "0.3"], capture_output=True, text=True, timeout=60)
    finally:
        job.stop(drain=True)
        result = job.wait(60)
    assert out.returncode == 0, out.stderr
    view = [j for j in json.loads(out.stdout) if j["pid"] == os.getpid()]
    assert len(view) == 1 and view[0]["job"] == "watched" and view[0]["state"] == "running"
    operators = {op["operator"]: op for op in view[0]["operators"]}
    assert list(operators) == ["numbers", "double", "total", "out"]
    for name in ("numbers", "double"):  # chained: one process per instance, busy or not the same shares
        assert operators[name]["records_in_per_s"] > 0 and operators[name]["records_out_per_s"] > 0
        assert operators[name]["instances"] == 2 and len(operators[name]["per_instance"]) == 2
        assert operators[name]["processes"] == ["numbers[0]", "numbers[1]"]
    assert operators["total"]["records_in_per_s"] > 0
    for op in operators.values():
        assert op["busy"] + op["idle"] + op["backpressured"] == pytest.approx(1.0, abs=1e-3)
    # the counters seen are a prefix of what the job counted in the end
    final = result.per_operator()
    for name, op in operators.items():
        assert 0 < op["records_in"] <= final[name]["records_in"] or name == "out"
    assert mine() == []  # the board went with the job


def test_the_board_holds_exactly_what_the_job_reports_at_the_end():
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(100_000)}, batch_size=1000).filter("odd", lambda b: b["x"] % 2 == 1) \
        .collect("out")
    result = p.run()
    timeline = result.timeline()
    operator = timeline["operator"].to_numpy()
    for name, row in result.per_operator().items():
        last = np.flatnonzero(operator == name)[-1]
        assert timeline["records_in"][last] == row["records_in"]
        assert timeline["records_out"][last] == row["records_out"]
    assert result.per_operator()["odd"]["records_out"] == 50_000


def counted(records: int, busy_s: float, started: float, idle_s: float = 0.0):
    from mpstream.counters import OperatorCounters

    return OperatorCounters("op", 0, "op[0]", 1, records, records, 0, 0, 0, 0, 0, None, busy_s, idle_s, 0.0, "", 0.0,
                            started)


def sampled(taken: float, op):
    from mpstream.counters import JobCounters

    return JobCounters("j", "", 1, 0.0, taken, "running", 0, None, 0, None, [op])


def test_timeline_keeps_memory_bounded_and_its_whole_span():
    from mpstream.timeline import MAX_SAMPLES

    timeline = Timeline(["op"], 0.0)
    for i in range(3 * MAX_SAMPLES):
        op = counted(i * 10, i * 0.25, started=1.0)
        timeline.add(sampled(i * 0.25, op))
    assert len(timeline.seconds) <= MAX_SAMPLES
    columns = timeline.columns()
    assert columns["seconds"][-1] >= (3 * MAX_SAMPLES - 1) * 0.25 - timeline.interval
    np.testing.assert_allclose(columns["records_in_per_s"], 40.0)  # 10 records every 0.25 s
    np.testing.assert_allclose(columns["busy"], 1.0)


def test_a_restart_is_marked_and_counts_go_on_from_where_they_were(tmp_path):
    marker = tmp_path / "killed"

    def die_once(batch):
        if batch["x"][0] >= 50_000 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), 9)
        return batch

    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(100_000)}, batch_size=1000).map("fragile", die_once).collect("out")
    with pytest.warns(UserWarning, match="restarting the job"):
        result = p.run(checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval=0.05, restart_backoff=0.01)
    assert result.restarts == 1
    recorded = result.recording
    assert len(recorded.restarts) == 1 and recorded.restarts[0] > 0
    timeline = result.timeline()
    src = timeline["records_in"][timeline["operator"].to_numpy() == "src"]
    assert np.all(np.diff(src) >= 0)  # carried over the restart, never back
    assert src[-1] >= 100_000  # replayed records count again
    assert result["out"].num_rows == 100_000


def test_metrics_endpoint_serves_the_counters_in_prometheus_text_format():
    from prometheus_client.parser import text_string_to_metric_families

    from conftest import wait_until

    def scrape():
        with urllib.request.urlopen(job.metrics_url, timeout=30) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        records = {(s.labels["operator"], s.labels["instance"]): s.value
                   for s in families["mpstream_records_in"].samples if s.name == "mpstream_records_in_total"}
        return families, records

    def every_source_instance_counted():  # each task publishes on its own 0.25 s schedule
        records = scrape()[1]
        return all(records.get((op, str(i)), 0) > 0 for op in ("numbers", "double") for i in (0, 1))

    job = started(endless(), metrics_port=0)
    try:
        wait_until(every_source_instance_counted, timeout=30, what="every source instance's counts scraped")
        families, records = scrape()
    finally:
        job.stop(drain=True)
        job.wait(60)
    assert set(records) == {(op, str(i)) for op in ("numbers", "double", "total", "out") for i in (0, 1)}
    assert records[("numbers", "0")] > 0 and records[("double", "1")] > 0
    busy = [s.value for s in families["mpstream_busy_seconds"].samples if s.name == "mpstream_busy_seconds_total"]
    assert sum(busy) > 0
    assert "mpstream_input_fill_ratio" in families and "mpstream_checkpoints" in families
    with pytest.raises(OSError):  # served only while the job runs
        urllib.request.urlopen(job.metrics_url, timeout=5)


def test_metrics_port_taken_or_invalid_is_a_clear_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = Pipeline()
        p.from_arrays("src", {"x": np.arange(10)}).collect("out")
        with pytest.raises(PlanError, match=f"metrics_port={port}: cannot serve metrics.*choose a free port"):
            p.run(metrics_port=port)
    with pytest.raises(PlanError, match="metrics_port must be a TCP port"):
        p.run(metrics_port=70000)


def test_metrics_without_prometheus_client_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(10)}).collect("out")
    with pytest.raises(PlanError, match=r"pip install 'mpstream\[metrics\]'"):
        p.run(metrics_port=0)


def test_plot_draws_a_png_from_a_real_run(tmp_path):
    job = started(endless())
    job.stop(drain=True)
    result = job.wait(60)
    saved = tmp_path / "run.json"
    result.save_timeline(str(saved))
    out = subprocess.run([sys.executable, "-m", "mpstream", "plot", str(saved), "-o", str(tmp_path / "run.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "run.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_file_without_a_timeline_says_what_to_give_it(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"events": 3}\n')
    out = subprocess.run([sys.executable, "-m", "mpstream", "plot", str(bad)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "holds no timeline" in out.stderr and "mpstream demo --json" in out.stderr
    assert not (tmp_path / "run.png").exists()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_true_draws_a_bar_per_source_with_its_total_on_a_terminal(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    p = Pipeline()
    a = p.from_arrays("clicks", {"x": np.arange(30_000)}, batch_size=1000)
    b = p.from_arrays("views", {"x": np.arange(20_000)}, batch_size=1000)
    a.union(b).collect("out")
    p.run(progress=True)
    drawn = screen.getvalue()
    assert "clicks" in drawn and "30.0k/30.0k" in drawn
    assert "views" in drawn and "20.0k/20.0k" in drawn


def test_progress_true_draws_nothing_off_a_terminal(capfd):
    p = Pipeline()
    p.from_arrays("clicks", {"x": np.arange(1000)}).collect("out")
    assert p.run(progress=True)["out"].num_rows == 1000
    assert capfd.readouterr().err == ""


def test_top_render_without_jobs_says_so():
    assert top.render([]) == "no mpstream job is running (that this user can see)"


def test_a_new_attempt_carries_on_what_the_last_counted_even_past_its_total():
    """Attempt 1 counted 6,000 records; attempt 2 (another start) is at 200,000 by the next
    sample: 206,000 in all, though no counter went back."""
    timeline = Timeline(["op"], 0.0)
    timeline.add(sampled(0.0, counted(0, 0.0, started=0.0)))  # not started yet
    timeline.add(sampled(0.25, counted(3_000, 0.2, started=1.0)))
    timeline.add(sampled(0.5, counted(6_000, 0.4, started=1.0)))
    timeline.add(sampled(0.75, counted(0, 0.0, started=0.0)))  # setting its words afresh
    timeline.add(sampled(1.0, counted(200_000, 0.3, started=2.0)))
    columns = timeline.columns()
    assert columns["records_in"].tolist() == [3_000, 6_000, 6_000, 206_000]
    assert columns["records_in_per_s"].tolist() == [12_000, 12_000, 0, 800_000]


class Quiet:
    """A source that gives two batches, then nothing for an hour (until stopped)."""

    def __init__(self):
        from mpstream.sources import Source

        class Burst(Source):
            def open(self, ctx):
                super().open(ctx)
                self.sent = 0

            def poll(self):
                if self.sent < 2:
                    self.sent += 1
                    return {"x": np.arange(500)}
                return None

            def next_awake(self):
                import time
                return time.time() + 3600

            def snapshot(self):
                return self.sent

            def restore(self, states):
                self.sent = states[0]

        self.make = Burst


def test_a_burst_then_quiet_input_is_on_the_board_without_more_records():
    from conftest import wait_until
    from mpstream.counters import Board

    p = Pipeline()
    p.source("burst", Quiet().make).map("after", lambda b: b, chain=False).collect("out")
    job = p.start()
    try:
        def counted():
            boards = [b for b in (Board.read(path) for path in mine()) if b is not None]
            ops = {o.name: o for b in boards for o in b.operators}
            return ops.get("after") is not None and ops["after"].records_in == 1000 \
                and ops["after"].waiting == "input"

        wait_until(counted, timeout=30, what="the 1,000 records of the burst on the board")
    finally:
        job.stop(drain=True)
        job.wait(60)


def test_a_task_that_ended_is_neither_busy_nor_idle_after():
    import time

    def slow(batch):
        time.sleep(0.05)  # the work of a slow operator, not a synchronisation
        return batch

    p = Pipeline()
    p.from_arrays("fast", {"x": np.arange(10_000)}, batch_size=1000).map("slow", slow, chain=False).collect("out")
    result = p.run()
    timeline = result.timeline()
    fast = timeline["operator"].to_numpy() == "fast"
    times = timeline["busy"][fast] + timeline["idle"][fast] + timeline["backpressured"][fast]
    assert times[-1] == 0  # the source ended long before the last sample: no time of it counts
    busy_s = result.recording.values[-1][result.recording.operators.index("fast"), 2]
    assert busy_s == pytest.approx(result.per_operator()["fast"]["busy_s"], abs=0.05)
    assert result.per_operator()["slow"]["busy_s"] >= 0.45


def test_a_readers_copy_of_a_wait_clock_never_goes_back_while_it_changes():
    """A writer process begins and ends waits as fast as it can; every snapshot's idle time is
    at least the one before (the seqlock: a wait is never seen both ended and going on)."""
    from mpstream.channel import WaitClock
    from mpstream.counters import Board

    board = Board.create("clock", ["t[0]"], [("t", 0, 0)])
    try:
        counters = board.task(0, [0])
        pid = os.fork()
        if pid == 0:  # the writer
            clock = counters.clock
            try:
                for _ in range(200_000):
                    clock.begin(WaitClock.INPUT)
                    clock.end()
            finally:
                os._exit(0)
        seen = []
        while True:
            done = os.waitpid(pid, os.WNOHANG)[0] == pid
            seen.append(board.snapshot().operators[0].idle_s)
            if done:
                break
        assert len(seen) > 10 and all(b >= a for a, b in zip(seen, seen[1:]))
    finally:
        board.close()


def test_a_progress_function_that_raises_leaves_no_board_and_no_server():
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(10)}).collect("out")
    before = threading.active_count()
    with pytest.raises(ZeroDivisionError):
        p.run(progress=lambda info: 1 / 0, metrics_port=0)
    assert mine() == []
    assert threading.active_count() == before  # the metrics server's thread is gone


def test_every_checkpoint_is_marked_on_the_timeline(tmp_path):
    import time

    def slow(batch):
        time.sleep(0.01)  # work, so that several checkpoints complete
        return batch

    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(50_000)}, batch_size=500).map("slow", slow).collect("out")
    result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.05)
    assert len(result.checkpoints) >= 2  # (a slow disk commits fewer)
    assert len(result.recording.checkpoints) == len(result.checkpoints)
    assert result.recording.checkpoints == sorted(result.recording.checkpoints)
