"""Barrier-aligned checkpoints: alignment at a gate, and consistent snapshots of a running job
(the state of every operator equals what the sources had emitted before their barrier)."""

import os
import signal

import numpy as np
import pytest
from conftest import run_on_small_tmpfs

from mpstream import Batch, Channel, ChannelReader, ChannelWriter, InputGate, RecordKind
from mpstream.aggregate import KeyedAggregate
from mpstream.checkpoint import CheckpointStore
from mpstream.operators import Operator
from mpstream.sources import OffsetSource
from mpstream.pipeline import Pipeline


def test_a_channel_that_delivered_a_barrier_is_not_read_until_all_have():
    with Channel("align-0", 1 << 14) as c0, Channel("align-1", 1 << 14) as c1:
        w0, w1 = ChannelWriter(c0.name), ChannelWriter(c1.name)
        w0.write(Batch({"v": np.array([1])}))
        w0.write_barrier(1)
        w0.write(Batch({"v": np.array([2])}))  # after the barrier: must wait for alignment
        for v in (10, 11):
            w1.write(Batch({"v": np.array([v])}))
        w1.write_barrier(1)
        gate = InputGate([ChannelReader(c0.name), ChannelReader(c1.name)])
        seen = []
        while len(seen) < 7:  # six records and the "aligned" mark
            channel, record = gate.read(timeout=5)
            with record:
                seen.append((channel, record.kind.name, None if record.batch is None else int(record.batch["v"][0])))
                if record.kind is RecordKind.BARRIER:
                    gate.block(channel)
            if set(gate.live) <= gate.blocked:
                seen.append("aligned")
                gate.unblock_all()
        assert seen.index((0, "BARRIER", None)) < seen.index((1, "DATA", 11))
        assert seen.index("aligned") < seen.index((0, "DATA", 2))
        assert seen[-1] == (0, "DATA", 2)
        gate.close()
        w0.close()
        w1.close()


def rows(instance, offset):
    rng = np.random.default_rng([instance, offset])
    return {"k": rng.integers(0, 50, 500), "v": rng.integers(0, 1000, 500)}


class UntilTwoCheckpoints(OffsetSource):
    """Emits deterministic batches; ends once it has taken part in two checkpoints."""

    def open(self, ctx):
        super().open(ctx)
        self.snapshots = 0

    def snapshot(self):
        self.snapshots += 1
        return {**super().snapshot(), "snapshots": self.snapshots}

    def read(self, offset):
        if self.snapshots >= 2 and offset >= 5:
            return None
        return Batch(rows(self.ctx.instance, offset))


@pytest.mark.parametrize("parallelism", [1, 2])
def test_a_committed_checkpoint_is_a_consistent_cut(tmp_path, parallelism):
    p = Pipeline(channel_capacity=1 << 16)
    a = p.source("a", UntilTwoCheckpoints, parallelism=2)
    b = p.source("b", UntilTwoCheckpoints)
    (a.union(b).map("double", lambda batch: {"k": batch["k"], "v": batch["v"] * 2})
      .key_by("k").aggregate("agg", {"v": "sum", "*": "count"}, parallelism=parallelism)
      .collect("out"))
    result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.001)
    assert result.checkpoints, "the sources end only after two checkpoints, one must have committed"
    store = CheckpointStore(str(tmp_path))
    n = store.complete()[-1]
    meta = store.metadata(n)
    assert sorted(meta["states"]) == sorted(
        ["a-0", "a-1", "b-0"] + [f"double-{i}" for i in range(2)] + [f"agg-{i}" for i in range(parallelism)]
        + [f"out-{i}" for i in range(parallelism)])
    assert meta["stats"]["bytes"] > 0 and meta["stats"]["duration_s"] >= meta["stats"]["alignment_s"] >= 0
    # the aggregates hold exactly the rows each source emitted before its recorded offset
    want = KeyedAggregate("k", {"v": "sum", "*": "count"})
    for source, instances in (("a", 2), ("b", 1)):
        for i in range(instances):
            offset = store.read_state(n, source, i).operator["offset"]
            for o in range(offset):
                r = rows(i, o)
                want.update(Batch({"k": r["k"], "v": r["v"] * 2}))
    got = KeyedAggregate("k", {"v": "sum", "*": "count"})
    for i in range(parallelism):
        state = store.read_state(n, "agg", i).operator
        if state is not None:
            got.merge(state)
    table = lambda agg: sorted(zip(*(agg.result()[c].tolist() for c in ("k", "v_sum", "count"))))  # noqa: E731
    assert table(got) == table(want)


def test_checkpoint_stats_and_retention_in_a_run(tmp_path):
    p = Pipeline(channel_capacity=1 << 16)
    p.source("s", UntilTwoCheckpoints).key_by("k").aggregate("agg", {"v": "max"}).collect("out")
    result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.001, checkpoint_retain=1)
    assert len(os.listdir(tmp_path)) == 1  # older ones removed, abandoned ones discarded
    for stats in result.checkpoints:
        assert set(stats) == {"id", "duration_s", "alignment_s", "snapshot_s", "bytes", "in_flight_rows", "unaligned",
                              "unaligned_after_s"}
        assert stats["in_flight_rows"] == 0 and stats["unaligned"] is False and stats["unaligned_after_s"] is None


def test_at_least_once_checkpoints_without_alignment(tmp_path):
    """No channel is blocked, so a snapshot may include records after the barrier: the state
    holds at least the rows the sources emitted before their offsets."""
    p = Pipeline(channel_capacity=1 << 16)
    a = p.source("a", UntilTwoCheckpoints, parallelism=2)
    (a.key_by("k").aggregate("agg", {"v": "sum", "*": "count"}).collect("out"))
    result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.001, exactly_once=False)
    assert result.checkpoints
    store = CheckpointStore(str(tmp_path))
    n = store.complete()[-1]
    emitted = sum(store.read_state(n, "a", i).operator["offset"] for i in range(2)) * 500
    counted = sum(int(store.read_state(n, "agg", i).operator["count"].sum()) for i in range(2))
    assert counted >= emitted


class AsksForACheckpoint(OffsetSource):
    """At offset 3 it asks its coordinator for a checkpoint (SIGUSR1); it ends once one is
    committed."""

    def open(self, ctx):
        super().open(ctx)
        self.committed = False

    def notify_checkpoint_complete(self, checkpoint_id):
        self.committed = True

    def read(self, offset):
        if offset == 3:
            os.kill(os.getppid(), signal.SIGUSR1)
        return None if self.committed else Batch(rows(0, offset))


def test_a_checkpoint_on_demand(tmp_path):
    p = Pipeline(channel_capacity=1 << 16)
    p.source("s", AsksForACheckpoint).key_by("k").aggregate("agg", {"v": "sum"}).collect("out")
    result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=1e9)  # never by the interval
    store = CheckpointStore(str(tmp_path))
    assert store.read_state(1, "s", 0).operator["offset"] >= 3
    assert store.complete() == [1, 2] and result.final_checkpoint == 2  # the one asked for, then the final one


FULL_DISK_JOB = """
import sys, warnings
import numpy as np
from mpstream.pipeline import Pipeline
warnings.simplefilter("always")
p = Pipeline(channel_capacity=1 << 16)
gen = lambda i, o: None if o >= 400 else {"k": np.arange(o * 1000, o * 1000 + 1000), "v": np.ones(1000)}
p.from_generator("src", gen).key_by("k").aggregate("agg", {"v": "sum"}).collect("out")
with warnings.catch_warnings(record=True) as caught:
    result = p.run(checkpoint_dir=sys.argv[1], checkpoint_interval=0.002, tolerable_checkpoint_failures=10**6)
failed = [w for w in caught if "failed and was discarded" in str(w.message)]
print("ROWS", result["out"].num_rows, "FAILED", len(failed) > 0, "COMMITTED", len(result.checkpoints))
print(str(failed[0].message) if failed else "")
"""


def test_a_full_disk_fails_checkpoints_but_not_the_job(tmp_path):
    """The checkpoint directory on a 256 KiB tmpfs (needs root): state outgrows it, each
    checkpoint then fails with a warning, and the job still completes."""
    root = tmp_path / "small"
    root.mkdir()
    out = run_on_small_tmpfs(FULL_DISK_JOB, str(root), "256k")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ROWS 400000 FAILED True")
    assert "No space left on device" in lines[1] and "operator 'agg' instance 0" in lines[1]


@pytest.mark.parametrize("how", ["missing", "empty", "mistyped"])
def test_resume_without_a_checkpoint_is_an_error_unless_asked_to_start_fresh(tmp_path, how):
    from mpstream import CheckpointError

    directory = tmp_path / "chk"
    if how == "empty":
        directory.mkdir()
    elif how == "mistyped":
        directory = tmp_path / "chk-typo"
        (tmp_path / "chk").mkdir()
    p = Pipeline()
    p.from_arrays("s", {"v": np.arange(5)}).collect("out")
    with pytest.raises(CheckpointError, match=f"no checkpoint was found in {directory}"):
        p.run(checkpoint_dir=str(directory), resume=True)
    assert not (tmp_path / "chk-typo").exists()  # nothing was created
    assert p.run(checkpoint_dir=str(directory), resume="if-present")["out"]["v"].tolist() == list(range(5))


class StuckSnapshot(Operator):
    """Passes batches on; its first snapshot waits until released is set."""

    def __init__(self, released):
        self.released = released

    def process(self, batch):
        return batch

    def snapshot(self):
        if self.released is not None:
            assert self.released.wait(60), "no checkpoint timed out"
            self.released = None
        return None


def released_on_expiry(monkeypatch):
    """An event the coordinator sets once it expired a checkpoint."""
    import multiprocessing

    from mpstream.checkpoint_coordinator import CheckpointCoordinator

    released = multiprocessing.get_context("fork").Event()
    expire = CheckpointCoordinator._expire

    def expire_then_release(self):
        expire(self)
        released.set()

    monkeypatch.setattr(CheckpointCoordinator, "_expire", expire_then_release)
    return released


def stuck_job(monkeypatch):
    """A job whose "stuck" operator waits in its first snapshot until a checkpoint has timed
    out: that checkpoint cannot complete in time, and the operator's task writes its files
    for it after it was discarded."""
    released = released_on_expiry(monkeypatch)
    p = Pipeline(channel_capacity=1 << 16)
    (p.source("s", UntilTwoCheckpoints).process("stuck", lambda: StuckSnapshot(released), chain=False)
      .key_by("k").aggregate("agg", {"v": "sum"}).collect("out"))
    return p


def test_a_checkpoint_that_times_out_is_discarded_and_the_job_goes_on(tmp_path, monkeypatch):
    p = stuck_job(monkeypatch)
    # 1 s, not 0.2: the checkpoints that are not stuck commit within it on a slow disk too
    with pytest.warns(UserWarning, match=r"timed out after 1 s \(checkpoint_timeout\): \d+ of \d+ tasks had not "
                                         r"acknowledged it \(.*stuck\[0\]"):
        result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.01, checkpoint_timeout=1.0,
                       tolerable_checkpoint_failures=100)
    store = CheckpointStore(str(tmp_path))
    assert result.final_checkpoint == store.complete()[-1]
    emitted = [rows(0, o) for o in range(store.read_state(result.final_checkpoint, "s", 0).operator["offset"])]
    expected = np.bincount(np.concatenate([r["k"] for r in emitted]), np.concatenate([r["v"] for r in emitted]),
                           minlength=50)
    out = result["out"]
    got = np.zeros(50, np.int64)
    got[out["k"]] = out["v_sum"]
    assert got.tolist() == expected.tolist()
    # what the stuck task wrote late for the timed-out checkpoint went with the next commit
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(store.directory(c)) for c in store.complete()]


def test_timed_out_checkpoints_past_the_tolerated_number_fail_the_job(tmp_path, monkeypatch):
    from mpstream.errors import CheckpointError

    p = stuck_job(monkeypatch)
    with pytest.raises(CheckpointError, match=r"1 checkpoint failed in a row, more than the 0 tolerated; the last, "
                                              r"checkpoint \d+: timed out after 0.2 s .*raise checkpoint_timeout, or "
                                              r"pass unaligned_checkpoints=True"):
        p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.01, checkpoint_timeout=0.2,
              tolerable_checkpoint_failures=0)


def test_files_written_late_for_a_final_checkpoint_that_timed_out_are_removed_at_the_end(tmp_path, monkeypatch):
    released = released_on_expiry(monkeypatch)
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(10)}).process("stuck", lambda: StuckSnapshot(released), chain=False).collect(
        "out")
    with pytest.warns(UserWarning, match="the final checkpoint 1 failed and was discarded; the job ends without it "
                                         r"\(no sink waits for it\): timed out after 0.2 s"):
        result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=3600, checkpoint_timeout=0.2)
    assert result["out"]["x"].tolist() == list(range(10)) and result.final_checkpoint is None
    assert os.listdir(tmp_path) == []  # no commit followed: the job's end removed what the stuck task wrote


def test_at_least_once_a_newer_barrier_ends_the_alignment_of_one_that_timed_out():
    """Channels are not blocked: the fast channel's BARRIER(2) comes before the slow one's
    BARRIER(1) (checkpoint 1 timed out). Checkpoint 2 is aligned from then on, and the late
    BARRIER(1) counts for nothing (it used to complete 1, leaving 2 one barrier short)."""
    from mpstream.barrier import AlignedBarrierHandler, AtLeastOnceBarrierHandler

    with Channel("alo-0", 1 << 14) as c0, Channel("alo-1", 1 << 14) as c1:
        gate = InputGate([ChannelReader(c0.name), ChannelReader(c1.name)])
        handler = AtLeastOnceBarrierHandler(gate)
        assert handler.on_barrier(0, 1) and handler.complete() is None
        assert handler.on_barrier(0, 2) and handler.complete() is None
        assert not handler.on_barrier(1, 1) and handler.complete() is None
        assert handler.on_barrier(1, 2) and handler.complete() == 2
        aligned = AlignedBarrierHandler(gate)
        aligned.on_barrier(0, 3)
        assert not aligned.on_barrier(1, 2) and gate.blocked == {0}  # an older one blocks nothing
        gate.close()


def test_a_stop_whose_checkpoint_times_out_fails_instead_of_waiting_forever(tmp_path):
    import multiprocessing

    from mpstream.errors import CheckpointError

    never = multiprocessing.get_context("fork").Event()
    p = Pipeline()
    (p.from_generator("ticks", lambda i, offset: {"k": np.arange(10) % 3, "v": np.arange(10)})
      .process("stuck", lambda: StuckSnapshot(never), chain=False).collect("out"))
    job = p.start(checkpoint_dir=str(tmp_path), checkpoint_interval=3600, checkpoint_timeout=0.2,
                  tolerable_checkpoint_failures=0)
    job.stop()  # its checkpoint is the first one: the stuck snapshot holds it
    with pytest.raises(CheckpointError, match=r"checkpoint 1: timed out after 0.2 s .*stuck\[0\]"):
        job.wait(timeout=60)


def test_a_checkpoint_timeout_must_be_positive(tmp_path):
    from mpstream.errors import PlanError

    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(3)}).collect("out")
    with pytest.raises(PlanError, match="checkpoint_timeout must be > 0 seconds, got 0"):
        p.run(checkpoint_dir=str(tmp_path), checkpoint_timeout=0)
