"""Unaligned checkpoints: under backpressure the barriers overtake the records waiting in the
rings, the checkpoint keeps those records (in-flight data), and a restore processes them once:
SIGKILLed workers still give exactly the reference result (numpy)."""

import os
import time

import numpy as np
import pytest

from mpstream import CheckpointError, PlanError, RestoreError, WorkerDiedError
from mpstream.checkpoint import CheckpointStore
from mpstream._mps import lib
from mpstream.barrier import UNALIGNED, InFlightCopy
from mpstream.batch import Batch, Frame
from mpstream.channel import Channel, ChannelReader, ChannelWriter, InputGate, LookAhead, RecordKind
from mpstream.operators import Aggregate, Operator
from mpstream.pipeline import Pipeline
from mpstream.testing import Once, RandomKiller, TestingSource, kill_me

BATCHES, ROWS, KEYS = 150, 2000, 300


def rows(instance, offset):
    rng = np.random.default_rng([instance, offset, 5])
    keys = rng.integers(0, KEYS, ROWS)
    keys[rng.random(ROWS) < 0.3] = 3  # a hot key
    return {"k": keys, "v": rng.integers(0, 100, ROWS)}


def reference():
    sums, counts = np.zeros(KEYS, np.int64), np.zeros(KEYS, np.int64)
    for i in range(2):
        for o in range(BATCHES):
            r = rows(i, o)
            np.add.at(sums, r["k"], r["v"] * 3)
            counts += np.bincount(r["k"], minlength=KEYS)
    return {k: (int(sums[k]), int(counts[k])) for k in np.flatnonzero(counts)}


def table(batch):
    return {int(k): (int(s), int(c)) for k, s, c in zip(batch["k"], batch["v_sum"], batch["count"])}


class SlowSum(Aggregate):
    """A keyed sum that costs CPU per batch (so the rings before it fill up), and SIGKILLs
    itself once, when told that a checkpoint holding in-flight rows was committed."""

    def __init__(self, checkpoints, markers):
        super().__init__("k", {"v": "sum", "*": "count"})
        self.checkpoints, self.markers = checkpoints, markers

    def process(self, batch):
        noise = np.random.default_rng(0).random(40_000)
        for _ in range(3):
            np.sort(noise)
        return super().process(batch)

    def notify_checkpoint_complete(self, checkpoint_id):
        die_after_in_flight(self.checkpoints, self.markers, checkpoint_id)


def die_after_in_flight(checkpoints, markers, checkpoint_id):
    """SIGKILLs the caller once (with markers), when checkpoint_id holds in-flight rows."""
    stats = CheckpointStore(checkpoints).metadata(checkpoint_id)["stats"]
    if markers and stats["in_flight_rows"] and Once(markers, "slow")():
        with open(os.path.join(markers, "killed-after"), "w") as f:
            f.write(str(checkpoint_id))
        kill_me()


def build(checkpoints, markers=None, parallelism=2, unbounded=False):
    parts = [[rows(i, o) for o in range(BATCHES)] for i in range(2)]
    p = Pipeline(channel_capacity=1 << 18)
    p.source("src", lambda: TestingSource(*parts, unbounded=unbounded), parallelism=2) \
     .map("triple", lambda b: {"k": b["k"], "v": b["v"] * 3}) \
     .key_by("k").process("slow", lambda: SlowSum(checkpoints, markers), parallelism=parallelism) \
     .collect("out")
    return p


@pytest.mark.parametrize("aligned_timeout", [None, 0.0], ids=["unaligned", "aligned-then-unaligned"])
def test_a_restore_from_an_unaligned_checkpoint_processes_its_in_flight_rows_once(tmp_path, aligned_timeout):
    """The slow operator dies right after a checkpoint that holds in-flight rows committed:
    the restarted job processes those rows from the checkpoint and the rest from the
    sources, each exactly once. With an aligned timeout of 0 each checkpoint starts aligned
    and turns unaligned at once: the slow operator, aligning its two inputs, snapshots
    in the middle, and copies only the channel whose barrier had not come."""
    chk, markers = str(tmp_path / "chk"), tmp_path / "markers"
    markers.mkdir()
    with pytest.warns(UserWarning, match="restarting the job from its last checkpoint"):
        result = build(chk, str(markers)).run(checkpoint_dir=chk, checkpoint_interval=0.05, checkpoint_retain=1000,
                                              restarts=3, unaligned_checkpoints=True,
                                              aligned_checkpoint_timeout=aligned_timeout)
    assert table(result["out"]) == reference()
    killed_after = int((markers / "killed-after").read_text())
    assert result.restarts == 1
    store = CheckpointStore(chk)
    assert store.metadata(killed_after)["stats"]["in_flight_rows"] > 0
    held = [store.read_state(killed_after, "slow", i).in_flight for i in range(2)]
    assert any(held) and all(set(h or {}) <= {"triple.0", "triple.1"} for h in held)


@pytest.mark.parametrize("aligned_timeout", [None, 0.01], ids=["unaligned", "aligned-for-10ms"])
def test_unaligned_checkpoints_with_random_sigkills_give_the_exact_result(tmp_path, aligned_timeout):
    chk = str(tmp_path / "chk")
    with pytest.warns(UserWarning), RandomKiller(3, seed=7):
        result = build(chk).run(checkpoint_dir=chk, checkpoint_interval=0.02, restarts=10, restart_backoff=0.01,
                                checkpoint_retain=1000, unaligned_checkpoints=True,
                                aligned_checkpoint_timeout=aligned_timeout)
    assert table(result["out"]) == reference()
    # every attempt's checkpoints (the result lists the last attempt's only: a kill near the end
    # leaves it with none but the final one, which holds nothing in flight)
    store = CheckpointStore(chk)
    taken = [store.metadata(n)["stats"] for n in store.complete()]
    assert sum(c["in_flight_rows"] for c in taken) > 0  # some barrier did overtake records
    # unaligned from the start: every one; aligned for 10 ms first: some turned (behind full rings)
    assert any(c["unaligned"] for c in taken)
    assert aligned_timeout is not None or all(c["unaligned"] for c in taken)
    # when each turned: at the trigger, or once it had been aligned for the aligned timeout
    turned = [c["unaligned_after_s"] for c in taken if c["unaligned"]]
    assert all(t == 0.0 for t in turned) if aligned_timeout is None else all(t >= aligned_timeout for t in turned)
    assert all(c["unaligned_after_s"] is None for c in taken if not c["unaligned"])


class PacedSource(TestingSource):
    """Instance 0 takes 5 ms per batch, instance 1 50 ms (work they do, not a
    synchronisation): at a checkpoint, instance 0's barrier reaches the keyed operator within
    a few ms, instance 1's after its current batch, up to 50 ms later."""

    def poll(self):
        time.sleep(0.005 if self.ctx.instance == 0 else 0.05)
        return super().poll()


class KeyedSum(Aggregate):
    """A keyed sum that SIGKILLs itself once, after a checkpoint whose in-flight rows all
    come from source instance 1: instance 0 always has a batch in flight before its barrier,
    so that checkpoint turned unaligned after instance 0's barrier had come (mid-alignment)."""

    def __init__(self, checkpoints, markers):
        super().__init__("k", {"v": "sum", "*": "count"})
        self.checkpoints, self.markers = checkpoints, markers

    def notify_checkpoint_complete(self, checkpoint_id):
        held = CheckpointStore(self.checkpoints).read_state(checkpoint_id, "slow", 0).in_flight or {}
        if set(held) == {"src.1"} and Once(self.markers, "slow")():
            with open(os.path.join(self.markers, "killed-after"), "w") as f:
                f.write(str(checkpoint_id))
            kill_me()


def test_a_checkpoint_that_turns_unaligned_while_aligning_restores_exactly(tmp_path):
    """The keyed operator gets BARRIER(n) from source instance 0 first, and the checkpoint
    turns unaligned (after 20 ms) before instance 1's comes: the snapshot holds the records of
    channel 1 before its barrier, and none of channel 0 (what follows its barrier comes after
    the snapshot, as aligned; a copy of it would only end at the next barrier, so no such
    checkpoint could complete). It dies after such a checkpoint committed; the restored job
    counts every row once."""
    chk, markers = str(tmp_path / "chk"), tmp_path / "markers"
    markers.mkdir()
    parts = [[rows(0, o) for o in range(150)], [rows(1, o) for o in range(15)]]
    p = Pipeline(channel_capacity=1 << 18)
    p.source("src", lambda: PacedSource(*parts), parallelism=2).key_by("k").process(
        "slow", lambda: KeyedSum(chk, str(markers)), parallelism=1).collect("out")
    with pytest.warns(UserWarning, match="restarting the job from its last checkpoint"):
        result = p.run(checkpoint_dir=chk, checkpoint_interval=0.03, checkpoint_retain=1000, restarts=3,
                       unaligned_checkpoints=True, aligned_checkpoint_timeout=0.02)
    sums, counts = np.zeros(KEYS, np.int64), np.zeros(KEYS, np.int64)
    for part in parts:
        for r in part:
            np.add.at(sums, r["k"], r["v"])
            counts += np.bincount(r["k"], minlength=KEYS)
    assert table(result["out"]) == {k: (int(sums[k]), int(counts[k])) for k in np.flatnonzero(counts)}
    assert (markers / "killed-after").exists() and result.restarts == 1


def test_checkpoints_stay_aligned_within_the_aligned_timeout(tmp_path):
    chk = str(tmp_path / "chk")
    result = build(chk).run(checkpoint_dir=chk, checkpoint_interval=0.02, unaligned_checkpoints=True,
                            aligned_checkpoint_timeout=300)
    assert table(result["out"]) == reference()
    assert result.checkpoints and all(c["in_flight_rows"] == 0 and not c["unaligned"] and c["unaligned_after_s"] is None
                                      for c in result.checkpoints)


def test_a_task_aligning_a_barrier_that_turns_unaligned_copies_only_the_channels_still_before_it():
    from mpstream.barrier import AlignedBarrierHandler

    with Channel("ta", 1 << 14) as a, Channel("tb", 1 << 14) as b:
        wa, wb = ChannelWriter(a.name), ChannelWriter(b.name)
        gate = InputGate([ChannelReader(a.name), ChannelReader(b.name)])
        handler = AlignedBarrierHandler(gate)
        wa.write_barrier(3)
        wa.write(Batch({"x": np.array([1])}))  # after a's barrier: not in flight
        wb.write(Batch({"x": np.array([2])}))  # before b's barrier: in flight
        wb.write_barrier(3)
        channel, record = gate.wait(0)
        assert channel == 0 and record.kind is RecordKind.BARRIER
        with record:
            handler.on_barrier(channel, record.value)
        assert gate.blocked == {0}
        assert handler.abandon(4) == set() and gate.blocked == set()  # another checkpoint: nothing passed
        handler.on_barrier(0, 3)
        passed = handler.abandon(3)
        assert passed == {0} and gate.blocked == set() and handler.complete() is None
        copy = InFlightCopy(3, gate, {}, 0.0, passed)
        assert copy.scan()
        assert list(copy.records) == [1] and [v["x"].tolist() for _, v in copy.records[1]] == [[2]]
        for writer in (wa, wb):
            writer.close()
        gate.close()


def died_after_an_in_flight_checkpoint(chk, markers, job):
    """Runs job until its slow operator SIGKILLs itself (restarts=0: the job ends there); the
    newest checkpoint, which holds in-flight rows."""
    with pytest.raises(WorkerDiedError, match="operator 'slow' .* was killed by SIGKILL"):
        job.run(checkpoint_dir=chk, checkpoint_interval=0.05, checkpoint_retain=1000, restarts=0,
                unaligned_checkpoints=True)
    newest = CheckpointStore(chk).complete()[-1]
    assert CheckpointStore(chk).metadata(newest)["stats"]["in_flight_rows"] > 0
    return newest


@pytest.mark.parametrize("parallelism", [1, 2, 3])
def test_in_flight_rows_of_a_keyed_edge_resume_at_any_parallelism(tmp_path, parallelism):
    """Each new instance takes the in-flight rows the hash partitioner routes to it now."""
    chk, markers = str(tmp_path / "chk"), tmp_path / "markers"
    markers.mkdir()
    newest = died_after_an_in_flight_checkpoint(chk, str(markers), build(chk, str(markers)))
    result = build(chk, parallelism=parallelism).run(checkpoint_dir=chk, resume=True, unaligned_checkpoints=True)
    assert result.restored_from == newest
    assert table(result["out"]) == reference()


class SlowMap(Operator):
    """A stateless map that costs CPU per batch and SIGKILLs itself once after a checkpoint
    holding in-flight rows committed."""

    def __init__(self, checkpoints, markers):
        self.checkpoints, self.markers = checkpoints, markers

    def process(self, batch):
        np.sort(np.random.default_rng(0).random(120_000))
        return {name: batch[name] for name in batch}

    def notify_checkpoint_complete(self, checkpoint_id):
        die_after_in_flight(self.checkpoints, self.markers, checkpoint_id)


def pairs(k, v):
    """The multiset of (k, v) rows as sorted codes."""
    return np.sort(np.asarray(k, np.int64) * 1000 + np.asarray(v, np.int64))


def input_pairs():
    """pairs() of every row the two source instances produce."""
    want = [rows(i, o) for i in range(2) for o in range(BATCHES)]
    return pairs(np.concatenate([r["k"] for r in want]), np.concatenate([r["v"] for r in want]))


def published(directory):
    """The rows (int columns) of the CSV files a transactional sink published, as one array."""
    tables = [np.loadtxt(directory / name, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
              for name in os.listdir(directory) if name.endswith(".csv")]
    return np.concatenate([t for t in tables if t.size])


@pytest.mark.parametrize("parallelism", [1, 3])
def test_in_flight_batches_of_a_rebalanced_edge_resume_at_another_parallelism(tmp_path, parallelism):
    """A round-robin edge into a stateless operator: every in-flight batch goes to exactly one
    new instance. A transactional sink publishes each row once across both runs."""
    chk, markers, out = str(tmp_path / "chk"), tmp_path / "markers", tmp_path / "out"
    markers.mkdir()

    def job(p, markers=None):
        pipeline = Pipeline(channel_capacity=1 << 18)
        parts = [[rows(i, o) for o in range(BATCHES)] for i in range(2)]
        pipeline.source("src", lambda: TestingSource(*parts), parallelism=2).rebalance() \
            .process("slow", lambda: SlowMap(chk, markers), parallelism=p) \
            .to_files("out", str(out), transactional=True, parallelism=2)
        return pipeline

    newest = died_after_an_in_flight_checkpoint(chk, str(markers), job(2, str(markers)))
    assert job(parallelism).run(checkpoint_dir=chk, resume=True, unaligned_checkpoints=True).restored_from == newest
    got = published(out)
    assert np.array_equal(pairs(got[:, 0], got[:, 1]), input_pairs())


def timed(instance, offset):
    """rows() with timestamps that only grow per source instance."""
    return {**rows(instance, offset), "ts": np.arange(offset * ROWS, (offset + 1) * ROWS)}


class Watch(SlowMap):
    """A slow stateless stage that marks each row behind its event time when it arrives: with
    timestamps that only grow per source, no row may ever be marked."""

    def open(self, ctx):
        super().open(ctx)
        self.watermark = -(2**63)

    def on_watermark(self, watermark):
        self.watermark = watermark

    def process(self, batch):
        out = super().process(batch)
        return {"k": out["k"], "v": out["v"], "late": (np.asarray(out["ts"]) < self.watermark).astype(np.int64)}


@pytest.mark.parametrize("mid,watch", [(2, 1), (2, 3), (1, 2), (3, 2)])
def test_rescaled_in_flight_rows_fall_behind_no_watermark(tmp_path, mid, watch):
    """Event time across a rescale. A rescaled stage replays rows of one producer that several
    old instances held; a stage whose upstream was rescaled gets rows an old producer had not
    sent through another one. Either way no row may land behind a watermark sent after it, or
    a window that already fired would drop it (a review measured 7,500-26,000 rows lost)."""
    chk, markers, out = str(tmp_path / "chk"), tmp_path / "markers", tmp_path / "out"
    markers.mkdir()

    def job(mid, watch, markers=None):
        pipeline = Pipeline(channel_capacity=1 << 18)
        parts = [[timed(i, o) for o in range(BATCHES)] for i in range(2)]
        pipeline.source("src", lambda: TestingSource(*parts), parallelism=2).with_event_time("ts").rebalance() \
            .map("mid", lambda batch: batch, parallelism=mid) \
            .key_by("k").process("slow", lambda: Watch(chk, markers), parallelism=watch) \
            .to_files("out", str(out), transactional=True, parallelism=2)
        return pipeline

    newest = died_after_an_in_flight_checkpoint(chk, str(markers), job(2, 2, str(markers)))
    assert job(mid, watch).run(checkpoint_dir=chk, resume=True, unaligned_checkpoints=True).restored_from == newest
    got = published(out)
    assert len(got) == 2 * BATCHES * ROWS
    assert int(got[:, 2].sum()) == 0  # rows behind the watermark


def test_in_flight_rows_of_a_custom_partitioned_edge_are_not_routed_again(tmp_path):
    """A custom partitioner need not route a row the same way twice: its in-flight rows resume
    only at their parallelism (an aligned checkpoint resumes at any)."""
    chk, markers = str(tmp_path / "chk"), tmp_path / "markers"
    markers.mkdir()

    def job(p, markers=None):
        pipeline = Pipeline(channel_capacity=1 << 18)
        parts = [[rows(i, o) for o in range(BATCHES)] for i in range(2)]
        pipeline.source("src", lambda: TestingSource(*parts), parallelism=2) \
            .key_by("k", partitioner=lambda batch, n: batch["k"] % n) \
            .process("slow", lambda: SlowMap(chk, markers), parallelism=p).collect("out")
        return pipeline

    newest = died_after_an_in_flight_checkpoint(chk, str(markers), job(2, str(markers)))
    with pytest.raises(CheckpointError, match=rf"operator 'slow' had parallelism 2 in checkpoint {newest} and has 3 "
                                              r"now, and the checkpoint holds \d+ in-flight rows"):
        job(3).run(checkpoint_dir=chk, resume=True, unaligned_checkpoints=True)


def test_in_flight_rows_of_an_operator_chained_after_a_rescale_are_refused_or_routed(tmp_path):
    """slow at parallelism 3 after a source at 2 runs in its own processes (a rebalanced edge)
    and holds in-flight rows; at 2 it would be chained into the source's process, where
    nothing replays them (a review measured 92,000 of 600,000 rows lost). That is refused,
    naming the way out; with chain=False the rows are routed, each published once."""
    chk, markers, out = str(tmp_path / "chk"), tmp_path / "markers", tmp_path / "out"
    markers.mkdir()

    def job(p, markers=None, chain=True):
        pipeline = Pipeline(channel_capacity=1 << 18)
        parts = [[rows(i, o) for o in range(BATCHES)] for i in range(2)]
        pipeline.source("src", lambda: TestingSource(*parts), parallelism=2) \
            .process("slow", lambda: SlowMap(chk, markers), parallelism=p, chain=chain) \
            .to_files("out", str(out), transactional=True, parallelism=2, chain=False)
        return pipeline

    newest = died_after_an_in_flight_checkpoint(chk, str(markers), job(3, str(markers)))
    with pytest.raises(RestoreError, match="operator 'slow': checkpoint .* holds in-flight rows .* chained to 'src'; "
                                           "give it chain=False"):
        job(2).run(checkpoint_dir=chk, resume=True, unaligned_checkpoints=True)
    assert job(2, chain=False).run(checkpoint_dir=chk, resume=True, unaligned_checkpoints=True).restored_from == newest
    got = published(out)
    assert np.array_equal(pairs(got[:, 0], got[:, 1]), input_pairs())


def test_stop_takes_an_aligned_checkpoint_that_resumes_at_another_parallelism(tmp_path):
    """Stopped once a checkpoint with in-flight rows committed: the stop's own checkpoint is
    aligned (it holds none), so the job resumes at another parallelism, exactly."""
    chk = str(tmp_path / "chk")
    store, handle = CheckpointStore(chk), []

    def progress(info):
        done = store.complete()
        if handle and (info["seconds"] > 30 or done and store.metadata(done[-1])["stats"]["in_flight_rows"]):
            handle[0].stop()

    handle.append(build(chk, unbounded=True).start(checkpoint_dir=chk, checkpoint_interval=0.02, progress=progress,
                                                   unaligned_checkpoints=True))
    stopped = handle[0].wait()
    assert stopped.stopped
    assert any(c["in_flight_rows"] for c in stopped.checkpoints[:-1])
    assert stopped.checkpoints[-1]["in_flight_rows"] == 0
    resumed = build(chk, parallelism=3).run(checkpoint_dir=chk, resume=True, unaligned_checkpoints=True)
    assert resumed.restored_from == stopped.final_checkpoint
    assert table(resumed["out"]) == reference()


def test_unaligned_checkpoints_need_exactly_once(tmp_path):
    with pytest.raises(PlanError, match="unaligned_checkpoints=True is exactly-once"):
        build(str(tmp_path)).run(checkpoint_dir=str(tmp_path), exactly_once=False, unaligned_checkpoints=True)


def test_an_aligned_timeout_needs_unaligned_checkpoints_and_no_negative_time(tmp_path):
    with pytest.raises(PlanError, match="aligned_checkpoint_timeout is when checkpoints turn unaligned: it needs "
                                        "unaligned_checkpoints=True"):
        build(str(tmp_path)).run(checkpoint_dir=str(tmp_path), aligned_checkpoint_timeout=1.0)
    with pytest.raises(PlanError, match=r"aligned_checkpoint_timeout must be >= 0 seconds \(or None\), got -1"):
        build(str(tmp_path)).run(checkpoint_dir=str(tmp_path), unaligned_checkpoints=True,
                                 aligned_checkpoint_timeout=-1)
    with pytest.raises(PlanError, match=r"aligned_checkpoint_timeout \(5 s\) must be below checkpoint_timeout \(5 s\)"):
        build(str(tmp_path)).run(checkpoint_dir=str(tmp_path), unaligned_checkpoints=True,
                                 aligned_checkpoint_timeout=5, checkpoint_timeout=5)


def test_a_look_ahead_copies_records_without_taking_them():
    with Channel("ahead", 1 << 14) as chan:
        writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
        writer.write(Batch({"x": np.arange(3)}))
        writer.write_watermark(7)
        writer.write(Batch({"y": np.arange(2.0)}))  # a new schema on the way
        writer.write_barrier(4)
        ahead = LookAhead(reader)
        found = [ahead.next() for _ in range(4)]
        assert ahead.next() is None
        assert [kind for kind, _ in found] == [RecordKind.DATA, RecordKind.WATERMARK, RecordKind.DATA,
                                               RecordKind.BARRIER]
        assert found[0][1]["x"].tolist() == [0, 1, 2] and found[1][1] == 7 and found[3][1] == 4
        assert found[2][1]["y"].tolist() == [0.0, 1.0]
        with reader.read() as record:  # the reader still gets everything, in order
            assert record.batch["x"].tolist() == [0, 1, 2]
            assert not np.shares_memory(record.batch["x"], found[0][1]["x"])  # the look-ahead copied
        writer.write(Batch({"y": np.arange(1.0)}))
        assert ahead.next()[1]["y"].tolist() == [0.0]
        writer.write(Batch({"s": np.array(["a", "bb"]), "n": np.ma.array([1, 2], mask=[0, 1])}))  # strings, nulls
        copied = ahead.next()[1]
        assert copied["s"].to_numpy().tolist() == ["a", "bb"] and copied["n"].tolist() == [1, None]
        writer.close()
        reader.close()


def test_a_copy_goes_on_after_the_gate_took_a_schema_record_beyond_it():
    """An input gate takes SCHEMA records by itself, even on a channel it then returns nothing
    from (its writer has not committed the DATA yet): the copy moves up to the reader and
    decodes what follows with the new schema (found by a review: scan() raised)."""
    with Channel("sa", 1 << 14) as a, Channel("sb", 1 << 14) as b:
        wa, wb = ChannelWriter(a.name), ChannelWriter(b.name)
        gate = InputGate([ChannelReader(a.name), ChannelReader(b.name)])
        for writer in (wa, wb):
            writer.write(Batch({"x": np.arange(3)}))
        for _ in range(2):
            gate.wait(0)[1].release()
        copy = InFlightCopy(5, gate, {}, 0.0)
        assert not copy.scan()
        new = Batch({"x": np.arange(3.0)})
        wa._write_bytes(lib.MPS_RECORD_SCHEMA, Frame(new.schema, wa._skew).encode_schema(), None)  # DATA not yet
        wb.write(Batch({"x": np.arange(4)}))
        channel, record = gate.wait(0)  # takes a's SCHEMA on its way to b's DATA
        assert channel == 1
        with record:
            copy.before_taking(channel)
        wa.write(new)
        for writer in (wa, wb):
            writer.write_barrier(5 | UNALIGNED)
        assert copy.scan()
        assert [value["x"].tolist() for _, value in copy.records[0]] == [[0.0, 1.0, 2.0]]
        assert [value["x"].tolist() for _, value in copy.records[1]] == [[0, 1, 2, 3]]
        for writer in (wa, wb):
            writer.close()
        gate.close()


class LateEnd(TestingSource):
    """Takes its time to restore (a large position to load): its END_OF_STREAM comes late."""

    def restore(self, states):
        time.sleep(1.0)  # a slow restore, not a synchronisation: the job must cope either way
        super().restore(states)


class Counter(Operator):
    """Counts rows; instance 1 is slower than 0 and SIGKILLs itself once after a checkpoint in
    which instance 0 had already finished (processed the end of its input)."""

    def __init__(self, checkpoints, markers):
        self.checkpoints, self.markers = checkpoints, markers

    def open(self, ctx):
        super().open(ctx)
        self.rows = 0

    def process(self, batch):
        if self.ctx.instance == 1:
            np.sort(np.random.default_rng(0).random(300_000))
        self.rows += batch.num_rows

    def snapshot(self):
        return self.rows

    def restore(self, states):
        self.rows = states[0]

    def close(self):
        return {"rows": np.array([self.rows])}

    def notify_checkpoint_complete(self, checkpoint_id):
        if self.ctx.instance == 1 and CheckpointStore(self.checkpoints).read_state(checkpoint_id, "count", 0).finished \
                and Once(self.markers, "kill")():
            kill_me()


def test_a_task_restored_as_finished_takes_part_in_unaligned_checkpoints(tmp_path):
    """It never reads its input again, so it has nothing in flight: it must acknowledge at
    once, not wait for its upstreams' ends to copy what precedes them (a review found the job
    hanging there)."""
    chk, markers = str(tmp_path / "chk"), tmp_path / "markers"
    markers.mkdir()
    parts = [[{"k": np.arange(100) % 2} for _ in range(60)] for _ in range(2)]
    p = Pipeline(channel_capacity=1 << 16)
    p.source("src", lambda: LateEnd(*parts), parallelism=2) \
     .key_by("k", partitioner=lambda batch, n: batch["k"] % n) \
     .process("count", lambda: Counter(chk, str(markers)), parallelism=2).collect("out")
    with pytest.warns(UserWarning, match="restarting"):
        job = p.start(checkpoint_dir=chk, checkpoint_interval=0.05, restarts=2, restart_backoff=0.01,
                      unaligned_checkpoints=True)
        try:
            result = job.wait(timeout=60)
        finally:
            job.cancel()
    assert Once(markers, "kill").fired
    assert int(result["out"]["rows"].sum()) == 2 * 60 * 100


TYPED_BATCHES, TYPED_ROWS, TYPED_KEYS = 100, 2000, 300


def typed_src_rows(instance, offset):
    rng = np.random.default_rng([instance, offset, 5])
    return {"k": rng.integers(0, TYPED_KEYS, TYPED_ROWS), "v": rng.integers(0, 100, TYPED_ROWS)}


class CheckingSum(Aggregate):
    def __init__(self, checkpoints, markers):
        super().__init__("k", {"v": "sum", "*": "count"})
        self.checkpoints, self.markers = checkpoints, markers

    def process(self, batch):
        v = np.asarray(batch["v"])
        assert batch["t"].dtype == np.dtype("M8[ms]") and np.array_equal(batch["t"].view(np.int64), v)
        assert np.array_equal(np.ma.getmaskarray(batch["n"]), v % 5 == 0)
        assert np.array_equal(np.ma.getdata(batch["n"]), np.where(v % 5 == 0, 0, v))
        noise = np.random.default_rng(0).random(40_000)
        for _ in range(3):
            np.sort(noise)
        return super().process(batch)

    def notify_checkpoint_complete(self, checkpoint_id):
        stats = CheckpointStore(self.checkpoints).metadata(checkpoint_id)["stats"]
        if stats["in_flight_rows"] and Once(self.markers, "slow")():
            with open(os.path.join(self.markers, "killed-after"), "w") as f:
                f.write(str(checkpoint_id))
            kill_me()


def test_unaligned_in_flight_rows_with_datetime_and_nullable_columns_restore(tmp_path):
    """In-flight records of an unaligned checkpoint (pickled as schema and buffers since
    checkpoint format 7) with a datetime and a nullable column: the aggregate checks every
    row's dtypes and nulls, dies once after a checkpoint with in-flight rows commits, and the
    restored job's totals are exact."""
    chk, markers = str(tmp_path / "chk"), tmp_path / "markers"
    markers.mkdir()
    parts = [[typed_src_rows(i, o) for o in range(TYPED_BATCHES)] for i in range(2)]
    p = Pipeline(channel_capacity=1 << 18)
    p.source("src", lambda: TestingSource(*parts), parallelism=2) \
     .map("triple", lambda b: {"k": b["k"], "v": b["v"] * 3, "t": (b["v"] * 3).astype("M8[ms]"),
                               "n": np.ma.MaskedArray(b["v"] * 3, mask=(b["v"] * 3) % 5 == 0)}) \
     .key_by("k").process("slow", lambda: CheckingSum(chk, str(markers)), parallelism=2).collect("out")
    with pytest.warns(UserWarning, match="restarting"):
        result = p.run(checkpoint_dir=chk, checkpoint_interval=0.05, checkpoint_retain=1000, restarts=3,
                       unaligned_checkpoints=True)
    assert result.restarts == 1
    killed_after = int((markers / "killed-after").read_text())
    store = CheckpointStore(chk)
    held = [store.read_state(killed_after, "slow", i).in_flight for i in range(2)]
    batches = [v for h in held if h for recs in h.values() for kind, v in recs if hasattr(v, "schema")]
    assert batches and all(dict(b.schema)["t"] == "<M8[ms]" and dict(b.schema)["n"] == "<i8?" for b in batches)
    out = result["out"]
    total = sum(int(np.sum(r["v"])) * 3 for part in parts for r in part)
    assert int(out["v_sum"].sum()) == total and int(out["count"].sum()) == 2 * TYPED_BATCHES * TYPED_ROWS
