"""File sinks under failures: the plain CSV sink resumes its file after a restore, the npz sink
is refused with checkpoints, the transactional sink publishes a bounded job's last epoch
only once the job's final checkpoint is committed, and its CSV, Parquet and Arrow files hold
every row once across a kill, rolled by size and partitioned Hive-style."""

import csv
import os

import numpy as np
import pytest

from conftest import wait_until

from mpstream import Operator
from mpstream.pipeline import Pipeline
from mpstream.sinks import FileSink, TransactionalFileSink
from mpstream.testing import Once, kill_me

ROWS, BATCHES = 50, 200


def ids(instance, offset):
    if offset >= BATCHES:
        return None
    return {"id": (instance * BATCHES + offset) * ROWS + np.arange(ROWS), "seq": np.full(ROWS, offset)}


def csv_column(directory, column):
    values = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".csv"):
            with open(os.path.join(directory, name), newline="") as f:
                values += [int(r[column]) for r in csv.DictReader(f)]
    return values


def committed(directory) -> bool:
    """Whether a checkpoint has been committed in directory (its metadata written)."""
    return os.path.isdir(directory) and any(os.path.exists(os.path.join(directory, e, "_metadata"))
                                            for e in os.listdir(directory))


class DyingFileSink(FileSink):
    """A plain CSV sink that SIGKILLs itself once, mid-stream, after a checkpoint was committed
    (so the restart restores the file's checkpointed state, not a fresh start)."""

    def __init__(self, directory, once, checkpoints):
        super().__init__(directory, "csv")
        self.once, self.checkpoints = once, checkpoints

    def process(self, batch):
        super().process(batch)
        if int(batch["seq"][0]) >= 150 and committed(self.checkpoints) and self.once():
            kill_me()


def test_the_plain_csv_sink_writes_every_row_once_after_restarts(tmp_path):
    """A map worker and the sink itself are SIGKILLed; the CSV files still hold each input row
    exactly once (the sink truncates its file back to its checkpointed length on restore)."""
    out, chk = tmp_path / "out", str(tmp_path / "chk")
    map_kill, sink_kill = Once(tmp_path, "map"), Once(tmp_path, "sink")

    def tag(batch):
        if committed(chk) and int(batch["seq"][0]) >= 60 and map_kill():
            kill_me()
        return batch

    def until_killed(instance, offset):
        """The rows, then (until both kills fired) filler rows with id -1 that keep the job going."""
        if offset < BATCHES:
            return ids(instance, offset)
        if map_kill.fired and sink_kill.fired:
            return None
        return {"id": np.array([-1]), "seq": np.array([BATCHES])}

    p = Pipeline(channel_capacity=1 << 16)
    (p.from_generator("src", until_killed, parallelism=2).map("tag", tag)
      .process("files", lambda: DyingFileSink(str(out), sink_kill, chk)))
    with pytest.warns(UserWarning, match="restarting"):
        result = p.run(checkpoint_dir=chk, checkpoint_interval=0.01, restarts=5, restart_backoff=0.01)
    assert result.restarts >= 1 and map_kill.fired and sink_kill.fired
    written = [i for i in csv_column(out, "id") if i >= 0]
    assert sorted(written) == list(range(2 * BATCHES * ROWS)), f"{len(written)} rows written"


def test_npz_files_with_checkpoints_are_refused_with_advice(tmp_path):
    p = Pipeline()
    p.from_generator("src", ids).to_files("files", str(tmp_path / "out"), "npz")
    with pytest.raises(ValueError, match=r"operator 'files'.*npz.*cannot be resumed.*(csv|transactional=True)"):
        p.run(checkpoint_dir=str(tmp_path / "chk"))
    assert not (tmp_path / "out").exists()  # refused before anything ran


class MarkingSink(TransactionalFileSink):
    """The transactional sink, telling when it took a snapshot and when its input ended."""

    def __init__(self, directory, snapshotted, closed):
        super().__init__(directory)
        self.snapshotted, self.closed = snapshotted, closed

    def snapshot(self):
        state = super().snapshot()
        self.snapshotted()
        return state

    def close(self):
        out = super().close()
        self.closed()
        return out


def test_a_bounded_jobs_last_epoch_is_published_only_after_its_final_checkpoint(tmp_path):
    """Branch 1 (keys -> aggregate -> transactional sink) ends while branch 2 runs on; then a
    worker of branch 2 is SIGKILLed. The job restarts from a checkpoint taken before branch 1's
    last epoch was committed, so that epoch must not have been published: every key once."""
    out = tmp_path / "out"
    sink_snapshot, sink_closed, keys_ended, victim = (Once(tmp_path, name) for name in
                                                      ("sink-snapshot", "sink-closed", "keys-ended", "victim"))

    def keys(instance, offset):
        if offset < 20:
            return {"k": np.arange(100) % 37, "v": np.ones(100, np.int64)}
        if not sink_snapshot.fired:  # a barrier has reached the sink: now end
            return {"k": np.zeros(0, np.int64), "v": np.zeros(0, np.int64)}
        keys_ended()
        return None

    def other(instance, offset):
        return None if victim.fired else {"x": np.arange(10)}

    class Victim(Operator):
        """Dies once the sink's input has ended; its snapshot waits until branch 1's source
        has ended, so the checkpoint whose barrier the sink saw last is not complete by then."""

        def process(self, batch):
            if sink_closed.fired and victim():
                kill_me()
            return batch

        def snapshot(self):
            wait_until(lambda: keys_ended.fired, timeout=60, what="branch 1's source to end")
            return None

    p = Pipeline(channel_capacity=1 << 16)
    (p.from_generator("keys", keys).key_by("k").aggregate("agg", {"v": "sum", "*": "count"})
      .process("files", lambda: MarkingSink(str(out), sink_snapshot, sink_closed)))
    p.from_generator("other", other).process("victim", Victim).to_callback("drop", lambda b: None)
    with pytest.warns(UserWarning, match="restarting"):
        p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.005, restarts=3, restart_backoff=0.01)
    assert victim.fired
    published = csv_column(out, "k")
    assert sorted(published) == list(range(37)), "a key was published twice (or never)"
    want_counts = np.bincount(np.tile(np.arange(100) % 37, 20), minlength=37)
    assert sorted(zip(published, csv_column(out, "count"))) == list(enumerate(want_counts.tolist()))
    assert os.listdir(out / ".pending") == []


def test_a_csv_sink_writes_its_header_for_an_empty_result(tmp_path):
    p = Pipeline()
    (p.from_arrays("src", {"k": np.zeros(0, np.int64), "v": np.zeros(0)})
      .key_by("k").aggregate("agg", {"v": "sum"}).to_files("files", str(tmp_path)))
    p.run()
    with open(tmp_path / "files-0.csv") as f:
        assert f.read().splitlines() == ["k,v_sum"]


class DyingTransactionalSink(TransactionalFileSink):
    """A transactional sink that SIGKILLs itself once, after a checkpoint was committed."""

    def __init__(self, directory, fmt, once, checkpoints, **options):
        super().__init__(directory, fmt, **options)
        self.once, self.checkpoints = once, checkpoints

    def process(self, batch):
        super().process(batch)
        if int(batch["seq"][0]) >= 120 and committed(self.checkpoints) and self.once():
            kill_me()


def published(directory, fmt):
    """Every published row of a transactional sink's directory (partition directories too),
    the partition column read back from the path."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.csv
    import pyarrow.ipc
    import pyarrow.parquet as pq

    rows = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if d != ".pending"]
        for name in names:
            path = os.path.join(root, name)
            table = {"csv": pyarrow.csv.read_csv, "parquet": pq.read_table,
                     "arrow": lambda p: pyarrow.ipc.open_file(p).read_all()}[fmt](path)
            part = os.path.relpath(root, directory)
            group = [int(part.split("=")[1])] * table.num_rows if part != "." else [None] * table.num_rows
            rows += list(zip(table.column("id").to_pylist(), group))
    return rows


@pytest.mark.parametrize("fmt", ["csv", "parquet", "arrow"])
def test_transactional_files_hold_every_row_once_rolled_and_partitioned_across_a_kill(tmp_path, fmt):
    """Rows go to Hive-style directories by group, roll over every few KB and every checkpoint;
    the sink is SIGKILLed once: the published files hold each row exactly once, none is left
    pending, and the group column is in the path, not in the files."""
    pytest.importorskip("pyarrow")
    out, chk = tmp_path / "out", str(tmp_path / "chk")
    once = Once(tmp_path, "kill")

    def rows(instance, offset):
        batch = ids(instance, offset)
        return None if batch is None else {**batch, "group": batch["id"] % 3}

    p = Pipeline(channel_capacity=1 << 16)
    p.from_generator("src", rows, parallelism=2).process(
        "files", lambda: DyingTransactionalSink(str(out), fmt, once, chk, max_bytes=4096, partition_by="group"))
    with pytest.warns(UserWarning, match="restarting"):
        p.run(checkpoint_dir=chk, checkpoint_interval=0.01, restarts=3, restart_backoff=0.01)
    got = published(out, fmt)
    assert once.fired and sorted(got) == sorted((i, i % 3) for i in range(2 * BATCHES * ROWS))
    assert sorted(os.listdir(out)) == [".pending", "group=0", "group=1", "group=2"]
    assert not [f for _, _, fs in os.walk(out / ".pending") for f in fs]
    names = os.listdir(out / "group=0")
    assert len(names) > 2 * 3 and all(n.startswith("files-") and n.endswith(f".{fmt}") for n in names)  # rolled


def test_parquet_and_arrow_sinks_write_nulls_and_every_type(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = Pipeline()
    src = p.from_batches("src", [{"k": np.array(["a", None, "c"], dtype=object),
                                  "n": np.ma.MaskedArray([1, 2, 3], mask=[0, 1, 0]),
                                  "t": np.array(["2026-11-24", "NaT", "2026-11-25"], "datetime64[ms]")}])
    src.to_parquet("pq", str(tmp_path / "pq"), partition_by="k")
    src.to_arrow_ipc("ipc", str(tmp_path / "ipc"))
    p.run()
    assert sorted(os.listdir(tmp_path / "pq")) == [".pending", "k=__HIVE_DEFAULT_PARTITION__", "k=a", "k=c"]
    table = pq.read_table(tmp_path / "pq" / "k=a")
    assert table.to_pylist() == [{"n": 1, "t": np.datetime64("2026-11-24", "ms").astype(object)}]
    (ipc,) = [n for n in os.listdir(tmp_path / "ipc") if n != ".pending"]
    back = pa.ipc.open_file(str(tmp_path / "ipc" / ipc)).read_all()
    assert back.column("k").to_pylist() == ["a", None, "c"] and back.column("n").to_pylist() == [1, None, 3]
    assert back.column("t").null_count == 1
