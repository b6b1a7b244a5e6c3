"""Recovery: workers SIGKILLed at chosen points (mid-stream, during alignment, during a
checkpoint write) and the job still produces exactly the reference result; restore at another
parallelism; resume after the whole process tree died."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mpstream.checkpoint import CheckpointStore
from mpstream.operators import Aggregate
from mpstream.pipeline import Pipeline
from mpstream.testing import Kill, Once, Stall, TestingSource, kill_me

BATCHES, ROWS, KEYS = 200, 5000, 1000  # 2M events
GATE_AT = 90  # the batch the sources can hold back (the last mid-stream kill)


def rows(instance, offset):
    rng = np.random.default_rng([instance, offset, 11])
    keys = rng.integers(0, KEYS, ROWS)
    keys[rng.random(ROWS) < 0.5] = 7  # a hot key
    return {"k": keys, "v": rng.integers(0, 100, ROWS), "seq": np.full(ROWS, offset)}


def reference(instances=2):
    sums = np.zeros(KEYS, np.int64)
    counts = np.zeros(KEYS, np.int64)
    for i in range(instances):
        for o in range(BATCHES):
            r = rows(i, o)
            np.add.at(sums, r["k"], r["v"] * 3)
            counts += np.bincount(r["k"], minlength=KEYS)
    return {k: (int(sums[k]), int(counts[k])) for k in np.flatnonzero(counts)}


def kill_once(marker_dir, name) -> None:
    """SIGKILLs this worker the first time (across restarts) any worker gets here."""
    if Once(marker_dir, name)():
        kill_me()


def fired(marker_dir) -> set[str]:
    """The faults that happened."""
    return {entry.removeprefix("once.") for entry in os.listdir(marker_dir)}


def disarm(marker_dir, *names) -> None:
    """These faults count as happened already."""
    for name in names:
        Once(marker_dir, name)()


def clicks(marker_dir, hold_for, gate):
    """BATCHES batches per instance; before batch GATE_AT, nothing until ``gate()`` is true;
    after the last batch, nothing until every fault in ``hold_for`` happened (the job runs on
    until every kill it waits for fired). Every build has both stalls, so source positions mean
    the same batches in all of them. A source dies the first time it takes checkpoint 1
    ("source-after-barrier"): the other one's barrier is downstream then."""
    parts = [[rows(i, o) for o in range(GATE_AT)] + [Stall(gate)]
             + [rows(i, o) for o in range(GATE_AT, BATCHES)]
             + [Stall(lambda: set(hold_for) <= fired(marker_dir))]
             for i in range(2)]
    return lambda: TestingSource(*parts, kill_at_checkpoint=(1, Once(marker_dir, "source-after-barrier")))


class DyingAggregate(Aggregate):
    def snapshot(self):
        state = super().snapshot()
        kill_once(self.marker_dir, f"agg-snapshot-{self.ctx.instance}")  # mid checkpoint
        return state


def build(marker_dir, parallelism=2, salt=4, files=None, hold_for=(), after_checkpoints=(None, 0)):
    """``after_checkpoints=(directory, n)``: the sources hold batch GATE_AT back until the job's
    checkpoint directory holds n committed checkpoints, so the map's kill there lands after them
    (without the hold, a fast job could pass batch GATE_AT before any checkpoint)."""
    directory, n = after_checkpoints
    gate = (lambda: True) if directory is None else (lambda: len(CheckpointStore(directory).complete()) >= n)

    def triple(batch):
        seq = int(batch["seq"][0])
        for at in (15, 50, GATE_AT):  # mid-stream
            if seq == at:
                kill_once(marker_dir, f"map-{at}")
        return {"k": batch["k"], "v": batch["v"] * 3}

    def dying_aggregate():
        agg = DyingAggregate("k", {"v": "sum", "*": "count"})
        agg.marker_dir = marker_dir
        return agg

    p = Pipeline(channel_capacity=1 << 18)
    keyed = p.source("clicks", clicks(marker_dir, hold_for, gate), parallelism=2).map("triple", triple).key_by("k")
    if salt:
        result = keyed.aggregate("agg", {"v": "sum", "*": "count"}, parallelism=parallelism, salt=salt)
    else:
        result = keyed.process("agg", dying_aggregate, parallelism=parallelism)
    result.collect("out")
    if files:
        result.to_files("files", files, transactional=True)
    return p


def published(directory):
    """{key: (sum, count)} from the CSV files a transactional sink published."""
    import csv

    out = {}
    for name in os.listdir(directory):
        if name.endswith(".csv"):
            with open(os.path.join(directory, name)) as f:
                for r in csv.DictReader(f):
                    assert int(r["k"]) not in out, f"key {r['k']} published twice"
                    out[int(r["k"])] = (int(r["v_sum"]), int(r["count"]))
    return out


def table(batch):
    return {int(k): (int(s), int(c)) for k, s, c in zip(batch["k"], batch["v_sum"], batch["count"])}


@pytest.mark.parametrize("salt", [0, 4])
def test_sigkilled_workers_recover_to_exactly_the_reference_result(tmp_path, salt):
    markers = tmp_path / "markers"
    markers.mkdir()
    at_checkpoints = {"source-after-barrier"} | (set() if salt else {"agg-snapshot-0", "agg-snapshot-1"})
    p = build(str(markers), salt=salt, files=str(tmp_path / "files"), hold_for=tuple(at_checkpoints))
    with pytest.warns(UserWarning, match="restarting the job from its last checkpoint"):
        result = p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.01, restarts=10,
                       restart_backoff=0.01)
    want = reference()
    assert table(result["out"]) == want  # no loss, no duplicate
    assert published(tmp_path / "files") == want  # the transactional sink too
    assert os.listdir(tmp_path / "files" / ".pending") == []
    expected_kills = {"map-15", "map-50", "map-90"} | at_checkpoints
    assert fired(markers) == expected_kills
    # kills that land in one attempt (two workers dying together) cost one restart
    assert 1 <= result.restarts <= len(expected_kills)
    assert all(seconds >= 0 for seconds in result.recovery_seconds)


def test_restore_at_another_parallelism(tmp_path):
    """A checkpoint taken with aggregate parallelism 3 restores into parallelism 2 (key groups)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    disarm(markers, "map-50", "map-15", "agg-snapshot-0", "agg-snapshot-1", "agg-snapshot-2", "source-after-barrier")
    chk = str(tmp_path / "chk")  # only the kill at batch 90, after a checkpoint
    first = build(str(markers), parallelism=3, salt=0, hold_for=("map-90",), after_checkpoints=(chk, 1))
    with pytest.raises(Exception, match="killed by SIGKILL"):  # no restarts left: stops at batch 90
        first.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.005, restarts=0)
    second = build(str(markers), parallelism=2, salt=0)
    result = second.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.005, resume=True)
    assert table(result["out"]) == reference()


RESUME_SCRIPT = textwrap.dedent("""
    import os, sys, signal
    sys.path.insert(0, {tests!r})
    from test_recovery import build
    p = build({markers!r}, salt=0, hold_for=("map-90",), after_checkpoints=({chk!r}, 2))
    p.run(checkpoint_dir={chk!r}, checkpoint_interval=0.005, restarts=0)
""")


@pytest.mark.parametrize("corrupt_newest", [False, True])
def test_resume_after_the_whole_process_tree_died(tmp_path, corrupt_newest):
    markers = tmp_path / "markers"
    markers.mkdir()
    # only map-90 fires: the job dies there, coordinator included
    disarm(markers, "map-15", "map-50", "source-after-barrier", "agg-snapshot-0", "agg-snapshot-1")
    script = RESUME_SCRIPT.format(tests=os.path.dirname(__file__), markers=str(markers), chk=str(tmp_path / "chk"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "killed by SIGKILL" in out.stderr
    store = CheckpointStore(str(tmp_path / "chk"))
    assert len(store.complete()) >= 2
    if corrupt_newest:  # a flipped byte in the newest checkpoint: the one before it is used
        path = os.path.join(store.directory(store.complete()[-1]), "agg-0.state")
        blob = bytearray(open(path, "rb").read())
        blob[-1] ^= 0xFF
        open(path, "wb").write(blob)
        with pytest.warns(UserWarning, match=r"skipping a damaged checkpoint: .*agg-0.state is corrupt"):
            result = build(str(markers), salt=0).run(checkpoint_dir=str(tmp_path / "chk"),
                                                     checkpoint_interval=0.005, resume=True)
    else:
        result = build(str(markers), salt=0).run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.005,
                                                 resume=True)
    assert table(result["out"]) == reference()


def test_transactional_file_sink_publishes_every_row_exactly_once(tmp_path):
    import csv

    markers = tmp_path / "markers"
    markers.mkdir()
    out_dir = tmp_path / "out"

    def tag(batch):
        seq = int(batch["seq"][0])
        for at in (20, 70, 150):
            if seq == at:
                kill_once(markers, f"tag-{at}")
        return {"id": batch["seq"] * ROWS + np.arange(ROWS), "k": batch["k"]}

    p = Pipeline(channel_capacity=1 << 18)
    (p.source("clicks", clicks(str(markers), (), lambda: True), parallelism=2).map("tag", tag)
      .to_files("files", str(out_dir), transactional=True))
    with pytest.warns(UserWarning, match="restarting"):
        result = p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.01, restarts=10,
                       restart_backoff=0.01)
    assert result.restarts >= 1
    ids = []
    for name in os.listdir(out_dir):
        if name.endswith(".csv"):
            with open(out_dir / name) as f:
                ids += [int(r["id"]) for r in csv.DictReader(f)]
    want = [o * ROWS + j for _ in range(2) for o in range(BATCHES) for j in range(ROWS)]
    assert sorted(ids) == sorted(want)  # each of the 2M rows once: none lost, none twice
    assert os.listdir(out_dir / ".pending") == []


@pytest.mark.parametrize("salt", [0, 3])
def test_a_value_column_that_changes_dtype_aggregates_exactly_across_a_restore(tmp_path, salt):
    """v is int64 in even batches and float64 in odd ones; a worker is SIGKILLed after a
    checkpoint holding int and float accumulators: the result equals numpy's over all rows."""
    markers = tmp_path / "markers"
    markers.mkdir()

    def mixed(instance, offset):
        rng = np.random.default_rng([instance, offset, 5])
        v = rng.integers(-50, 50, 400)
        return {"k": rng.integers(0, 30, 400), "v": v if offset % 2 == 0 else v + 0.25, "seq": np.full(400, offset)}

    def until_killed(instance, offset):
        """60 batches, then (until the kill fired) filler rows of key -1 that keep the job going."""
        if offset < 60:
            return mixed(instance, offset)
        return None if "map" in fired(markers) else {"k": np.array([-1]), "v": np.array([0]), "seq": np.array([60])}

    def maybe_die(batch):
        chk = tmp_path / "chk"
        if int(batch["seq"][0]) >= 40 and any((chk / e / "_metadata").exists() for e in os.listdir(chk)):
            kill_once(markers, "map")
        return batch

    p = Pipeline(channel_capacity=1 << 16)
    (p.from_generator("src", until_killed, parallelism=2).map("die", maybe_die)
      .filter("real", lambda b: b["k"] >= 0).key_by("k")
      .aggregate("agg", {"v": ["sum", "min", "max", "mean"], "*": "count"}, parallelism=2, salt=salt)
      .collect("out"))
    with pytest.warns(UserWarning, match="restarting"):
        out = p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.005, restarts=3,
                    restart_backoff=0.01)["out"]
    rows = [mixed(i, o) for i in range(2) for o in range(60)]
    k = np.concatenate([r["k"] for r in rows])
    v = np.concatenate([np.asarray(r["v"], np.float64) for r in rows])
    want = {int(key): (v[k == key].sum(), v[k == key].min(), v[k == key].max(), int((k == key).sum()))
            for key in np.unique(k)}
    got = {int(key): (s, lo, hi, c) for key, s, lo, hi, c in
           zip(*(out[c].tolist() for c in ("k", "v_sum", "v_min", "v_max", "count")))}
    assert got == want  # quarters and integers: every sum is exact in float64
    assert out["v_mean"].tolist() == pytest.approx([want[key][0] / want[key][3] for key in out["k"].tolist()])
    assert "map" in fired(markers)


def test_a_range_partitioned_aggregate_restores_its_own_state(tmp_path):
    """After key_by(..., "range") an instance's state holds the keys of its range: a restore at
    the same parallelism takes its own state (it re-split states by hash key group before)."""
    store = CheckpointStore(str(tmp_path / "chk"))
    crash = Once(tmp_path, "crash")
    batch = {"k": np.arange(10), "v": np.ones(10, np.int64)}
    items = [batch, Stall(lambda: len(store.complete()) >= 1), Kill(crash), batch]
    p = Pipeline()
    (p.source("src", lambda: TestingSource(items, items), parallelism=2).key_by("k", "range", bounds=[5])
      .aggregate("agg", {"v": "sum"}, parallelism=2).collect("out"))
    with pytest.warns(UserWarning, match="restarting"):
        result = p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.02)
    assert crash.fired
    assert sorted(zip(result["out"]["k"].tolist(), result["out"]["v_sum"].tolist())) == [(k, 4) for k in range(10)]


def test_resuming_a_stateful_operator_at_another_parallelism_is_refused_up_front(tmp_path):
    from mpstream import CheckpointError

    def build(parallelism):
        p = Pipeline()
        p.source("src", lambda: TestingSource([{"x": np.arange(5)}], [{"x": np.arange(5)}]), parallelism=2) \
         .to_files("sink", str(tmp_path / "out"), parallelism=parallelism)
        return p

    build(2).run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.05)
    with pytest.raises(CheckpointError, match="operator 'sink' had parallelism 2 .* and has 3 now"):
        build(3).run(checkpoint_dir=str(tmp_path / "chk"), resume=True)


def test_resuming_a_checkpoint_that_holds_an_operator_the_job_lacks_is_refused(tmp_path):
    """A state nobody restores would be lost without a word (as a salted aggregate's partial
    stage was, when that stage went away): resuming is refused, naming the operator. An
    operator without state may go."""
    from mpstream import CheckpointError

    def build(extra):
        p = Pipeline()
        stream = p.source("src", lambda: TestingSource([{"k": np.arange(5), "v": np.ones(5)}]))
        if extra == "map":
            stream = stream.map("scale", lambda b: b)
        if extra == "agg":
            stream = stream.key_by("k").aggregate("first", {"v": "sum"}).map(
                "back", lambda b: {"k": b["k"], "v": b["v_sum"]})
        stream.key_by("k").aggregate("agg", {"v": "sum"}).collect("out")
        return p

    build("map").run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.05)
    again = build(None).run(checkpoint_dir=str(tmp_path / "chk"), resume=True)  # 'scale' held no state
    assert again.restored_from is not None
    build("agg").run(checkpoint_dir=str(tmp_path / "chk2"), checkpoint_interval=0.05)
    with pytest.raises(CheckpointError, match="holds the state of operators this job does not have: 'first'"):
        build(None).run(checkpoint_dir=str(tmp_path / "chk2"), resume=True)


@pytest.mark.parametrize("unaligned", [False, True])
def test_output_emitted_before_a_barrier_survives_a_restore_from_it(tmp_path, unaligned):
    """prepare_snapshot_pre_barrier(n) output (an aggregate's changed keys) precedes BARRIER(n):
    a collect sink keeps it after a restore from n (it was tagged with epoch n and dropped)."""
    chk = str(tmp_path / "chk")
    crash = Once(tmp_path, "crash")
    first, second = {"k": np.arange(10), "v": np.ones(10, np.int64)}, {"k": np.arange(5), "v": np.ones(5, np.int64)}
    items = [first, Stall(lambda: len(CheckpointStore(chk).complete()) >= 1), Kill(crash), second]
    p = Pipeline()
    p.source("src", lambda: TestingSource(items)).key_by("k") \
     .aggregate("agg", {"v": "sum"}, emit="updates", update_interval=1000.0).collect("out")
    with pytest.warns(UserWarning, match="restarting"):
        result = p.run(checkpoint_dir=chk, checkpoint_interval=0.5, restarts=2, unaligned_checkpoints=unaligned)
    assert result.restarts == 1
    newest = dict(zip(result["out"]["k"].tolist(), result["out"]["v_sum"].tolist()))  # the last update per key
    assert newest == {k: 2 if k < 5 else 1 for k in range(10)}
