"""Unbounded and idle streams: idle jobs sleep, checkpoints go on after some tasks finished,
stop with a checkpoint and resume (at another parallelism), SIGTERM, timers across a restore."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import wait_until

from mpstream import KeyedOperator, Operator, Pipeline
from mpstream.checkpoint import CheckpointStore
from mpstream.sources import Source
from mpstream.testing import Once, Stall, TestingSource


def job_cpu_seconds() -> float:
    """CPU time of a job started here: its workers' and this process's threads but the main
    one (the coordinator's thread lives here). The test's own thread, sleeping through the
    period measured, is left out: its process also holds the whole test session, whose
    garbage collection or imports are not the job's."""
    me = psutil.Process()
    main = threading.main_thread().native_id
    total = sum(t.user_time + t.system_time for t in me.threads() if t.id != main)
    for p in me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def batch(keys, value=1):
    keys = np.asarray(keys)
    return {"k": keys, "v": np.full(len(keys), value, np.int64)}


def test_an_idle_source_costs_almost_no_cpu(tmp_path):
    """A job whose two sources have nothing to give for 2 s: its 4 processes and the
    coordinator together use well under 5% of one core meanwhile (CPU time, read by psutil)."""
    go = Once(tmp_path, "go")
    arrived = tmp_path / "arrived"
    items = [batch([1, 2]), Stall(lambda: go.fired), batch([3])]
    p = Pipeline(channel_capacity=1 << 16)
    (p.source("src", lambda: TestingSource(items, items), parallelism=2)
      .key_by("k").aggregate("agg", {"v": "sum"}, parallelism=2)
      .to_callback("seen", lambda b: arrived.touch(), parallelism=2))
    job = p.start()
    wait_until(lambda: len(job.workers()) == 4 and all(  # the sink chained to the aggregate
        psutil.Process(pid).status() in (psutil.STATUS_SLEEPING, psutil.STATUS_IDLE) for pid in job.workers().values()),
        timeout=60, what="the job to go idle")
    before = job_cpu_seconds()
    time.sleep(2.0)  # the idle period being measured, not a synchronisation
    used = job_cpu_seconds() - before
    go()
    result = job.wait()
    assert used < 0.1, f"an idle job used {used:.3f} s of CPU in 2 s"
    assert sorted(result.per_operator()["src"].items())  # it ran to the end
    assert result.per_operator()["agg"]["records_in"] == 6


class Paced(Source):
    """``rate`` rows a second in batches of rate/10, unbounded; position = rows produced."""

    def __init__(self, rate):
        self.rate = rate

    def open(self, ctx):
        super().open(ctx)
        self.rows, self.due = 0, time.time()

    def poll(self):
        if time.time() < self.due:
            return None
        self.due += 0.1
        n = self.rate // 10
        self.rows += n
        return {"k": np.arange(n) % 10, "v": np.ones(n, np.int64)}

    def next_awake(self):
        return self.due

    def snapshot(self):
        return self.rows

    def restore(self, states):
        self.rows = states[0]


def test_a_job_at_1000_events_per_second_uses_under_5_percent_of_a_core():
    p = Pipeline(channel_capacity=1 << 16)
    (p.source("src", lambda: Paced(500), parallelism=2).key_by("k")
      .aggregate("agg", {"v": "sum"}, parallelism=2, emit="updates", update_interval=0.5)
      .collect("out"))
    job = p.start()
    wait_until(lambda: len(job.workers()) == 4, timeout=60, what="the job's workers")  # collect chained
    before = job_cpu_seconds()
    time.sleep(2.0)  # the period being measured
    used = job_cpu_seconds() - before
    job.stop()
    result = job.wait()
    assert used < 0.1, f"1,000 events/s cost {used:.3f} s of CPU in 2 s"
    produced = sum(result.stopped_at["src"])
    latest = {}
    for k, v in zip(result["out"]["k"].tolist(), result["out"]["v_sum"].tolist()):
        latest[k] = v  # an upsert stream: the newest row per key is its total
    assert sum(latest.values()) == produced > 0


def test_checkpoints_go_on_after_one_of_two_sources_finished(tmp_path):
    """Source "short" ends at once; "long" runs until four more checkpoints were committed:
    the finished source no longer stops checkpoints (FLIP-147)."""
    store = CheckpointStore(str(tmp_path / "chk"))
    ended_after = tmp_path / "ended-after"  # the newest checkpoint id when "short" ended

    def enough():
        return ended_after.exists() and (store.complete() or [0])[-1] >= int(ended_after.read_text()) + 4

    class Short(TestingSource):
        def close(self):
            ended_after.write_text(str((store.complete() or [0])[-1]))

    p = Pipeline(channel_capacity=1 << 16)
    short = p.source("short", lambda: Short([batch([1, 2])]))
    long = p.source("long", lambda: TestingSource([batch([3]), Stall(enough), batch([4])]))
    short.union(long).key_by("k").aggregate("agg", {"v": "sum"}).collect("out")
    result = p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.01)
    assert sorted(zip(result["out"]["k"].tolist(), result["out"]["v_sum"].tolist())) == [(1, 1), (2, 1), (3, 1), (4, 1)]
    last = store.complete()[-1]
    assert store.read_state(last, "short", 0).finished and result.final_checkpoint == last
    assert len(result.checkpoints) >= 5  # four while "short" was finished, then the final one


def latest_per_key(rows):
    """An upsert stream's newest value per key, rows in order."""
    latest = {}
    for k, v in rows:
        latest[k] = v
    return latest


def published_rows(directory):
    """(k, v_sum) of every published CSV, in epoch order (the file name's epoch)."""
    rows = []
    for name in sorted(os.listdir(directory), key=lambda n: n.split(".")[1:3] if n.endswith(".csv") else []):
        if name.endswith(".csv"):
            with open(os.path.join(directory, name)) as f:
                rows += [(int(r["k"]), int(r["v_sum"])) for r in csv.DictReader(f)]
    return rows


ITEMS = [[batch(np.arange(i, i + 50) % 40, 1 + i % 3) for i in range(30)],
         [batch(np.arange(i, i + 70) % 40, 2) for i in range(30)]]


def stoppable(pipeline_parallelism, out_dir, gate):
    """ITEMS per source instance, the second half behind a Stall until ``gate`` fires."""
    items = [part[:15] + [Stall(lambda: gate.fired)] + part[15:] for part in ITEMS]
    p = Pipeline(channel_capacity=1 << 16)
    agg = (p.source("src", lambda: TestingSource(*items), parallelism=2).key_by("k")
            .aggregate("agg", {"v": "sum"}, parallelism=pipeline_parallelism, emit="updates", update_interval=0.05))
    agg.to_files("files", str(out_dir), transactional=True, parallelism=2)
    agg.collect("out")
    return p


def test_stop_with_a_checkpoint_then_resume_at_another_parallelism(tmp_path):
    chk, out = str(tmp_path / "chk"), tmp_path / "out"
    gate = Once(tmp_path, "gate")
    job = stoppable(2, out, gate).start(checkpoint_dir=chk, checkpoint_interval=0.02)
    wait_until(lambda: len(CheckpointStore(chk).complete()) >= 2, timeout=60, what="two checkpoints")
    job.stop()
    first = job.wait()
    assert first.stopped and first.final_checkpoint is not None
    assert first.stopped_at["src"] == [15, 15]  # both stalled at their 16th item: stopped there
    first_rows = [(k, v) for k, v in zip(first["out"]["k"].tolist(), first["out"]["v_sum"].tolist())]
    want_first = {}
    for part in ITEMS:
        for b in part[:15]:
            for k, v in zip(b["k"].tolist(), b["v"].tolist()):
                want_first[k] = want_first.get(k, 0) + v
    assert latest_per_key(first_rows) == want_first
    assert latest_per_key(published_rows(out)) == want_first  # committed by the stop's checkpoint

    gate()  # the second run reads on, at aggregate parallelism 3
    second = stoppable(3, out, gate).run(checkpoint_dir=chk, resume=True)
    want = {}
    for part in ITEMS:
        for b in part:
            for k, v in zip(b["k"].tolist(), b["v"].tolist()):
                want[k] = want.get(k, 0) + v
    second_rows = [(k, v) for k, v in zip(second["out"]["k"].tolist(), second["out"]["v_sum"].tolist())]
    assert latest_per_key(first_rows + second_rows) == want
    assert latest_per_key(published_rows(out)) == want
    assert second.started_at["src"] == [15, 15] and not os.listdir(out / ".pending")


class RunningTotal(Operator):
    """Its state is the sum of v over the rows it saw; it emits that sum after every batch."""

    def open(self, ctx):
        super().open(ctx)
        self.total = 0

    def process(self, batch):
        self.total += int(batch["v"].sum())
        return {"instance": np.array([self.ctx.instance]), "total": np.array([self.total])}

    def snapshot(self):
        return self.total

    def restore(self, states):
        self.total = states[0]


def test_a_job_stopped_unchained_resumes_chained_and_back_with_each_operators_state(tmp_path):
    """Chaining moves an operator between processes, not its state: stopped with its running
    total in a process of its own, the job resumes with it chained into the source's process,
    and stopped again, resumes unchained; every run's totals count each row once."""
    chk = str(tmp_path / "chk")
    gates = [Once(tmp_path, "gate0"), Once(tmp_path, "gate1")]

    def stall(g, instance):
        """A Stall that marks the source instance as waiting there."""
        def until():
            (tmp_path / f"at{g}.{instance}").touch()
            return gates[g].fired
        return Stall(until)

    items = [part[:10] + [stall(0, i)] + part[10:20] + [stall(1, i)] + part[20:] for i, part in enumerate(ITEMS)]

    def build(chain):
        p = Pipeline(channel_capacity=1 << 16)
        (p.source("src", lambda: TestingSource(*items), parallelism=2)
          .process("total", RunningTotal, chain=chain).collect("out", chain=chain))
        return p

    def stopped_at_stall(g, chain, resume):
        job = build(chain).start(checkpoint_dir=chk, resume=resume)
        wait_until(lambda: all((tmp_path / f"at{g}.{i}").exists() for i in range(2)), timeout=60,
                   what=f"both sources at stall {g}")
        job.stop()
        return job.wait()

    def totals(result):  # the newest total of each instance
        return latest_per_key(zip(result["out"]["instance"].tolist(), result["out"]["total"].tolist()))

    def sums(upto):
        return {i: sum(int(b["v"].sum()) for b in part[:upto]) for i, part in enumerate(ITEMS)}

    first = stopped_at_stall(0, chain=False, resume=False)
    assert first.stopped and first.stopped_at["src"] == [10, 10]
    assert first.processes() == {"src": ["src"], "total": ["total"], "out": ["out"]}
    assert totals(first) == sums(10)
    gates[0]()
    second = stopped_at_stall(1, chain=True, resume=True)
    assert second.started_at["src"] == [10, 10] and second.stopped_at["src"] == [21, 21]
    assert second.processes() == {"src": ["src", "total", "out"]}
    assert totals(second) == sums(20)  # restored: the first run's rows counted once
    gates[1]()
    third = build(chain=False).run(checkpoint_dir=chk, resume=True)
    assert third.started_at["src"] == [21, 21] and totals(third) == sums(30)


SIGTERM_JOB = textwrap.dedent("""
    import sys, numpy as np
    from mpstream import Pipeline
    from mpstream.testing import TestingSource
    items = [{"k": np.arange(10), "v": np.ones(10, np.int64)}] * 20
    p = Pipeline(channel_capacity=1 << 16)
    (p.source("src", lambda: TestingSource(items, unbounded=True)).key_by("k")
      .aggregate("agg", {"v": "sum"}, emit="updates").to_files("files", sys.argv[2], transactional=True))
    result = p.run(checkpoint_dir=sys.argv[1], checkpoint_interval=0.05)
    print("STOPPED", result.stopped, result.stopped_at["src"], result.final_checkpoint)
""")


def test_sigterm_stops_the_job_with_a_final_checkpoint(tmp_path):
    chk, out = tmp_path / "chk", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_JOB, str(chk), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(CheckpointStore(str(chk)).complete()) >= 1, timeout=60, what="a checkpoint")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "STOPPED True [20]" in stdout
    assert latest_per_key(published_rows(out)) == {k: 20 for k in range(10)}


class Reminder(Operator):
    """Registers a processing-time timer 1 s after its first batch; emits one row when it fires."""

    def __init__(self, fired_marker):
        self.fired_marker = fired_marker

    def process(self, batch):
        self.ctx.timers.register_processing_time(time.time() + 1.0, "remind")
        return None

    def on_timer(self, timer):
        open(self.fired_marker, "w").close()
        return {"reminder": np.array([timer.payload])}


def test_a_timer_pending_at_a_checkpoint_fires_after_the_restore(tmp_path):
    """The timer is registered before checkpoint 1; the source dies while taking checkpoint 2;
    the restored operator's timer fires in the new attempt and its row comes out once."""
    fired = str(tmp_path / "fired")
    die = Once(tmp_path, "die")
    p = Pipeline(channel_capacity=1 << 16)
    (p.source("src", lambda: TestingSource([batch([1]), Stall(lambda: os.path.exists(fired))],
                                           kill_at_checkpoint=(2, die)))
      .process("remind", lambda: Reminder(fired)).collect("out"))
    with pytest.warns(UserWarning, match="restarting"):
        result = p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.02, restart_backoff=0.01)
    assert die.fired and result.restarts == 1
    assert result["out"]["reminder"].to_numpy().tolist() == ["remind"]


def test_the_plan_imports_without_the_runtime_and_no_module_imports_one_that_imports_it_back():
    out = subprocess.run([sys.executable, "-c", "import sys, mpstream.plan; print(sorted(m for m in sys.modules "
                          "if m.startswith('mpstream')))"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['mpstream', 'mpstream.errors', 'mpstream.plan']"
    import ast
    import pathlib

    package = pathlib.Path(__file__).parent.parent / "mpstream"
    imports = {}
    for path in package.glob("*.py"):
        module = path.stem
        imports[module] = set()
        for node in ast.parse(path.read_text()).body:  # module-level imports (not TYPE_CHECKING ones)
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                imports[module] |= {n.split(".")[0] for n in names}
    imports.pop("__init__")

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in imports.get(start, ()))
    cycles = [m for m in imports if reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}"
    layers = ["pipeline", "coordinator", "task", "channel"]  # data flows one way: API -> ... -> channels
    for upper, lower in zip(layers, layers[1:]):
        assert not reaches(lower, upper), f"{lower} imports {upper}"


def test_rows_a_sink_gets_after_the_stop_barrier_come_once_across_the_resume(tmp_path):
    """A timer set while the stop's checkpoint was taken fires after its barrier: the stopped
    run does not return that row, the resumed run (whose checkpoint holds the timer) does."""
    fed = Once(tmp_path, "fed")
    gate = Once(tmp_path, "gate")

    class TimerAtSnapshot(Operator):
        def open(self, ctx):
            super().open(ctx)
            self.armed = False

        def process(self, batch):
            fed()

        def snapshot(self):
            if not self.armed:
                self.armed = True
                self.ctx.timers.register_processing_time(time.time(), "after the barrier")
            return self.armed

        def restore(self, states):
            self.armed = states[0]

        def on_timer(self, timer):
            return {"note": np.array([timer.payload])}

    def build():
        p = Pipeline()
        (p.source("src", lambda: TestingSource([batch([1]), Stall(lambda: gate.fired)]))
          .process("t", TimerAtSnapshot).collect("out"))
        return p

    chk = str(tmp_path / "chk")
    job = build().start(checkpoint_dir=chk, checkpoint_interval=1e9)
    wait_until(lambda: fed.fired, timeout=60, what="the operator to get its batch")
    job.stop()
    first = job.wait()
    gate()
    second = build().run(checkpoint_dir=chk, resume=True)
    notes = [r["note"].to_numpy().tolist() if r.num_rows else [] for r in (first["out"], second["out"])]
    assert sum(notes, []) == ["after the barrier"], notes


class KeyedTimer(KeyedOperator):
    """Per key: counts its rows, sets a timer 1 s ahead for the key (payload and key: the key)
    and leaves a mark in ``seen``; a timer leaves one in ``fired``."""

    def __init__(self, seen, fired):
        self.seen, self.fired = seen, fired

    def process(self, batch):
        for k in np.unique(batch["k"]).tolist():
            self.state[k] = self.state.get(k, 0) + 1
            self.ctx.timers.register_processing_time(time.time() + 1.0, k, key=k)
            open(os.path.join(self.seen, str(k)), "w").close()

    def on_timer(self, timer):
        open(os.path.join(self.fired, f"{timer.payload}.{self.ctx.instance}"), "w").close()
        return {"k": np.array([timer.payload]), "v": np.array([self.state.get(timer.payload, -1)])}


def test_keyed_timers_go_with_their_key_groups_to_another_parallelism(tmp_path):
    seen, *fired = tmp_path / "seen", tmp_path / "fired-1", tmp_path / "fired-2"  # marks of timers set; fired per run
    for directory in (seen, *fired):
        directory.mkdir()

    def build(parallelism, items, run):
        p = Pipeline()
        (p.source("src", lambda: TestingSource(items)).key_by("k")
          .process("t", lambda: KeyedTimer(str(seen), str(fired[run])), parallelism=parallelism).collect("out"))
        return p

    job = build(2, [batch(np.arange(4)), Stall(lambda: False)], 0).start(checkpoint_dir=str(tmp_path / "chk"),
                                                                          checkpoint_interval=3600)
    wait_until(lambda: len(os.listdir(seen)) == 4, timeout=60, what="every key's timer set")
    job.stop()  # its checkpoint holds the 4 timers (its barrier came after the batch)
    first = job.wait()
    assert first["out"].num_rows == 0  # the timers were pending at the stop (1 s ahead)
    resumed = [batch(np.arange(4)), Stall(lambda: len(os.listdir(fired[1])) >= 4)]  # goes on at position 1
    second = build(3, resumed, 1).run(checkpoint_dir=str(tmp_path / "chk"), resume=True)
    rows = sorted(zip(second["out"]["k"].tolist(), second["out"]["v"].tolist()))
    assert rows == [(k, 1) for k in range(4)]  # each key's timer once, where its state is


def test_requests_to_an_ended_job_do_nothing_and_write_nowhere(tmp_path):
    """stop(), checkpoint() and cancel() after the job ended: its wake-up pipe is closed, and a
    file opened since may have its descriptor; the calls must neither fail nor write there."""
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(10)}).collect("out")
    job = p.start()
    assert job.wait()["out"].num_rows == 10
    with open(tmp_path / "victim", "w+b") as victim:  # likely the pipe's old descriptor number
        job.stop()
        job.checkpoint()
        job.cancel()
        victim.seek(0)
        assert victim.read() == b""
    assert job.done
