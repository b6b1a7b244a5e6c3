"""The coordinator's own cost: it sleeps while it waits, calls the progress callback at its
stated rate, and keeps taking checkpoints for the whole job."""

import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mpstream.pipeline import Pipeline


def cpu_seconds() -> float:
    """CPU time of this process (the coordinator: the caller of run()), all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_waiting_coordinator_sleeps_reports_progress_at_its_rate_and_keeps_checkpointing(tmp_path):
    calls = []

    def slow(batch):
        time.sleep(0.005)  # the work of a slow operator, not a synchronisation
        return batch

    p = Pipeline(channel_capacity=1 << 16)
    (p.from_generator("fast", lambda i, offset: None if offset >= 300 else {"v": np.arange(1000)})
      .map("slow", slow).to_callback("sink", lambda b: None))
    before = cpu_seconds()
    result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.1, progress=calls.append)
    used = cpu_seconds() - before
    # 300 batches at >= 5 ms each: the job runs >= 1.5 s, so >= 5 checkpoint intervals
    assert result.seconds >= 1.5
    assert used < 0.1 * result.seconds + 0.5, f"the coordinator used {used:.2f} s of CPU in {result.seconds:.2f} s"
    assert len(calls) <= 5 * result.seconds + 2, f"progress called {len(calls)} times in {result.seconds:.2f} s"
    assert calls and calls[-1]["rows"] == 300_000
    assert len(result.checkpoints) >= 3, f"{len(result.checkpoints)} checkpoints"  # several (a slow disk: fewer)


def busy(instance, offset):
    """A source that always has something: it looks at its control messages between polls only."""
    return {"x": np.arange(10) + offset}


def test_a_stop_sent_before_the_tasks_were_ready_is_not_lost(tmp_path):
    """The coordinator rings a task's doorbell before the task has looked at it: the ring still
    counts (it hung 1 run in 5 before)."""
    for attempt in range(3):
        p = Pipeline(channel_capacity=1 << 16)
        p.from_generator("src", busy).map("m", lambda b: b, parallelism=2).to_callback("sink", lambda b: None)
        job = p.start(checkpoint_dir=str(tmp_path / f"chk{attempt}"), checkpoint_interval=0.001)
        job.stop()
        result = job.wait(timeout=60)
        assert result.stopped and result.final_checkpoint is not None


def test_a_drain_holds_for_the_attempt_after_a_restart(tmp_path):
    import pytest

    from mpstream import Operator
    from mpstream.checkpoint import CheckpointStore
    from mpstream.testing import Once, TestingSource, kill_me
    from conftest import wait_until

    die = Once(tmp_path, "die-in-close")

    class DiesInClose(Operator):
        def close(self):
            if die():
                kill_me()

    p = Pipeline()
    (p.source("src", lambda: TestingSource([{"x": np.arange(5)}], unbounded=True))
      .process("m", DiesInClose).collect("out"))
    store = CheckpointStore(str(tmp_path / "chk"))
    with pytest.warns(UserWarning, match="restarting"):
        job = p.start(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.05)
        wait_until(lambda: len(store.complete()) >= 2, timeout=60, what="two checkpoints")
        job.stop(drain=True)
        result = job.wait(timeout=60)
    assert die.fired and result.restarts == 1 and result["out"]["x"].tolist() == list(range(5))


def test_a_fresh_run_never_restarts_from_an_earlier_runs_checkpoint(tmp_path):
    import pytest

    from mpstream.testing import Kill, Once, TestingSource

    def build(items):
        p = Pipeline()
        p.source("src", lambda: TestingSource(items)).key_by("k").aggregate("agg", {"v": "sum"}).collect("out")
        return p

    batch = {"k": np.array([1, 2]), "v": np.array([10, 20])}
    chk = str(tmp_path / "chk")
    first = build([batch]).run(checkpoint_dir=chk, checkpoint_interval=5.0)
    assert first["out"]["v_sum"].tolist() == [10, 20] and first.final_checkpoint is not None
    crash = Once(tmp_path, "crash")
    with pytest.warns(UserWarning, match="restarting"):
        second = build([batch, batch, Kill(crash), batch]).run(checkpoint_dir=chk, checkpoint_interval=5.0)
    assert second.restarts == 1 and second.restored_from is None
    assert second["out"]["v_sum"].tolist() == [30, 60]  # not run 1's finished state


def test_a_failed_final_checkpoint_is_retried_at_the_checkpoint_interval(tmp_path, monkeypatch):
    """The commit fails for 0.3 s from its first attempt: retried every 0.2 s, the third
    attempt commits within the 3 failures tolerated (retried at once, four attempts failed in
    5 ms before)."""
    import time

    import pytest

    import mpstream.checkpoint as checkpoint
    from mpstream.testing import TestingSource

    commit, since = checkpoint.CheckpointStore.commit, {}

    def flaky(self, checkpoint_id, states, stats):
        first = since.setdefault("first attempt", time.monotonic())  # not the test's start: a slow disk
        if time.monotonic() < first + 0.3:
            raise checkpoint.CheckpointError("disk full (for a moment)")
        return commit(self, checkpoint_id, states, stats)

    monkeypatch.setattr(checkpoint.CheckpointStore, "commit", flaky)
    p = Pipeline()
    p.source("src", lambda: TestingSource([{"x": np.arange(3)}])).to_files("out", str(tmp_path / "out"),
                                                                          transactional=True)
    with pytest.warns(UserWarning, match=r"^final checkpoint \d+ failed and was discarded"):
        result = p.run(checkpoint_dir=str(tmp_path / "chk"), checkpoint_interval=0.2, tolerable_checkpoint_failures=3)
    assert result.final_checkpoint is not None
    assert [f for f in os.listdir(tmp_path / "out") if f.endswith(".csv")]  # the last epoch was published


def test_a_message_cut_off_out_of_band_is_an_end_of_file():
    """A task killed while it sends a batch out of band: the coordinator's receive() ends
    with EOFError (a closed pipe, as for any message), not with a hang or a partial batch."""
    import pickle
    from multiprocessing import Pipe

    from mpstream import Batch, messages

    ours, theirs = Pipe()
    arena = messages.BufferArena()
    whole = messages.Collected("out", (Batch({"x": np.arange(1000)}),), 0)
    messages.send_out_of_band(theirs, whole)
    got = messages.receive(ours, arena)
    assert got.sink == "out" and got.batches[0]["x"].tolist() == list(range(1000))
    buffers = []
    header = pickle.dumps(whole, protocol=5, buffer_callback=buffers.append)
    theirs.send(messages.Frames((8000,)))
    theirs.send_bytes(header)
    theirs.send_bytes(b"only part of it")  # then the sender dies
    theirs.close()
    with pytest.raises(EOFError):
        messages.receive(ours, arena)


def test_received_buffers_share_aligned_chunks_and_keep_their_bytes():
    """The coordinator reads collected buffers into slices of large chunks (huge pages: a
    fault per 2 MiB): every buffer keeps its own bytes, starts on a 64-byte boundary, and one
    as large as a chunk gets memory of its own."""
    from multiprocessing import Pipe

    from mpstream import Batch, messages

    ours, theirs = Pipe()
    arena = messages.BufferArena()
    sizes = [1, 1000, 3, 70_000, 1, 2_000_000]
    sent = [Batch({"x": np.arange(n, dtype=np.int64) * 3 + n, "y": np.full(n, n % 7, np.int8)}) for n in sizes]
    for batch in sent:
        writer = threading.Thread(target=messages.send_out_of_band, args=(theirs, messages.Collected("out", (batch,), 0)))
        writer.start()  # a message larger than the pipe holds: written while it is read
        got = messages.receive(ours, arena).batches[0]
        writer.join()
        for name in ("x", "y"):
            np.testing.assert_array_equal(got[name], batch[name])
            assert got[name].ctypes.data % 64 == 0
    assert not ours.poll()  # every byte sent was read
    big, small = arena.take(messages.BufferArena.CHUNK), arena.take(10)
    assert big.base is None and small.base is not None and len(big) == messages.BufferArena.CHUNK


def test_a_task_sends_small_collected_batches_together_and_large_ones_alone():
    """Small batches are copied (their ring record goes back) and go in one message per sink
    and flush, each run of one schema as one batch; a large one flushes what came before it
    (order kept) and goes alone, uncopied; 1 MiB gathered makes a flush by itself."""
    from mpstream import Batch
    from mpstream.output import COLLECT_ALONE_BYTES, COLLECT_BATCH_COST, COLLECT_FLUSH_BYTES, CollectOutput

    sent = []
    out = CollectOutput(sent.append)
    ring = np.arange(10)  # stands for a ring record's memory
    out.add("a", Batch({"x": ring[:4]}), 3)
    out.add("a", Batch({"x": ring[4:]}), 3)
    out.add("a", Batch({"y": np.arange(2.0)}), 3)  # another schema: a run of its own
    out.add("b", Batch({"x": np.arange(3)}), 3)
    ring[:] = -1  # the records were released and written over
    assert sent == []
    big = Batch({"x": np.arange(COLLECT_ALONE_BYTES // 8)})
    out.add("a", big, 3)
    assert [(m.sink, m.epoch, [b.schema for b in m.batches]) for m in sent] == [
        ("a", 3, [(("x", "<i8"),), (("y", "<f8"),)]), ("b", 3, [(("x", "<i8"),)]), ("a", 3, [(("x", "<i8"),)])]
    assert sent[0].batches[0]["x"].tolist() == list(range(10)) and sent[0].batches[1]["y"].tolist() == [0.0, 1.0]
    assert sent[1].batches[0]["x"].tolist() == [0, 1, 2] and sent[2].batches[0] is big
    sent.clear()
    for small in (Batch({"x": np.arange(COLLECT_ALONE_BYTES // 8 - 1)}), Batch({"x": np.arange(1)})):
        sent.clear()
        each = small.nbytes + COLLECT_BATCH_COST  # tiny batches count for more than their bytes
        for _ in range(-(-COLLECT_FLUSH_BYTES // each) - 1):
            out.add("a", small, 4)
        assert sent == []
        out.add("a", small, 4)
        assert len(sent) == 1 and sent[0].batches[0].num_rows == small.num_rows * -(-COLLECT_FLUSH_BYTES // each)
        out.flush(4)
        assert len(sent) == 1  # nothing more gathered


POLARS_THEN_JOB = """
import json, warnings
import numpy as np
import polars as pl
from mpstream import Pipeline

def job_warnings():
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(10)}).collect("out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert p.run()["out"]["x"].tolist() == list(range(10))
    return [(str(w.message), w.filename) for w in caught if issubclass(w.category, RuntimeWarning)]

before = job_warnings()  # polars imported, never run: no pool yet
pl.DataFrame({"a": [1, 2, 2]}).group_by("a").len()
print(json.dumps([before, job_warnings()]))
"""


def test_a_job_started_where_polars_ran_warns_that_polars_in_its_operators_would_hang():
    """polars' thread pool does not survive a fork: a worker that calls polars after its caller
    ran a polars query waits for ever. The job says so, once it is there, at the caller's line."""
    pytest.importorskip("polars", reason="polars is the bench extra's")
    out = subprocess.run([sys.executable, "-c", POLARS_THEN_JOB], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == []
    assert len(after) == 1 and after[0][1] == "<string>"  # the caller's line
    assert "polars has run in this process" in after[0][0] and "hangs in mpstream's forked workers" in after[0][0]


def test_a_job_start_closes_the_files_it_reads_to_look_for_fork_unsafe_pools():
    """The look at this process's thread names (/proc/self/task/*/comm) leaves no file open:
    a ResourceWarning per thread per job before."""
    import gc
    import threading
    import warnings

    from mpstream.coordinator import _warn_of_fork_unsafe_pools

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)  # a second thread: two names to read
    thread.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _warn_of_fork_unsafe_pools()
            gc.collect()
    finally:
        stop.set()
        thread.join()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
