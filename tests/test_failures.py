"""Failure paths of a running job: each ends with a specific error naming the operator, and
leaves no worker process and no /dev/shm segment behind (checked here and by conftest)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import psutil
import pytest
from conftest import CTRL_C, wait_until

from mpstream.pipeline import Pipeline
from mpstream import OperatorError, WorkerDiedError
from mpstream.testing import kill_me

SHM = "/dev/shm"


def numbers(n=50_000, batch_size=1000, parallelism=1):
    p = Pipeline(channel_capacity=1 << 20)
    return p, p.from_arrays("src", {"x": np.arange(n)}, parallelism=parallelism, batch_size=batch_size)


def explode_on_third(batch):
    if batch["x"][0] >= 2000:
        raise ValueError("bad record 2000")
    return batch


def test_an_operator_that_raises_fails_the_job_naming_it():
    p, s = numbers()
    s.map("parse", explode_on_third, parallelism=2).collect("out")
    with pytest.raises(OperatorError) as info:
        p.run()
    message = str(info.value)
    assert "operator 'parse' instance" in message and "ValueError: bad record 2000" in message
    assert "in explode_on_third" in message  # the worker's own traceback


def halves_then_raises(batch):
    yield batch.slice(0, 10)
    raise ValueError("bad second half")


@pytest.mark.parametrize("chain", [True, False])
def test_an_operator_whose_output_generator_raises_is_named(chain):
    """Output may be a generator (made a batch at a time): what it raises names its operator."""
    p, s = numbers()
    s.flat_map("split", halves_then_raises, chain=chain).collect("out")
    with pytest.raises(OperatorError, match=r"(?s)operator 'split' instance 0 failed: ValueError: bad second half"):
        p.run()


def test_output_that_is_not_batches_is_an_error_naming_the_operator():
    p, s = numbers()
    s.flat_map("odd", lambda b: [b, 42]).collect("out")
    with pytest.raises(OperatorError, match=r"operator 'odd' returned list: return a Batch, a mapping of columns"):
        p.run()


def test_a_source_that_raises_fails_the_job_naming_it():
    p = Pipeline(channel_capacity=1 << 20)

    def gen(instance, offset):
        if offset == 3:
            raise RuntimeError("upstream went away")
        return {"x": np.arange(10)}

    p.from_generator("feed", gen, parallelism=2).collect("out")
    with pytest.raises(OperatorError, match=r"operator 'feed' instance \d failed: RuntimeError: upstream went away"):
        p.run()


def kill_self_on_third(batch):
    if batch["x"][0] >= 2000:
        kill_me()
    return batch


def test_a_worker_killed_by_a_signal_is_reported_as_such():
    p, s = numbers()
    s.map("fragile", kill_self_on_third).collect("out")
    died = (r"operator 'src' \(with 'fragile', 'out' chained in its process\) instance 0 \(pid \d+\) "
            r"was killed by SIGKILL")
    with pytest.raises(WorkerDiedError, match=died):
        p.run()


HANGING_JOB = textwrap.dedent("""
    import threading, numpy as np
    from mpstream.pipeline import Pipeline
    p = Pipeline(channel_capacity=1 << 20)
    (p.from_generator("endless", lambda i, offset: {"x": np.arange(100)}, parallelism=2)
      .map("stuck", lambda b: threading.Event().wait(), parallelism=2).collect("out"))
    p.run()
""")


def start_hanging_job():
    """A coordinator in a subprocess, its 2 workers running (segments already unlinked): "stuck"
    and "out" run chained in the process of "endless"."""
    coordinator = subprocess.Popen([sys.executable, "-c", CTRL_C + HANGING_JOB], stderr=subprocess.PIPE, text=True)
    me = psutil.Process(coordinator.pid)

    def running():
        segments = [e for e in os.listdir(SHM) if e.startswith(f"mps.{coordinator.pid}.")]
        return len(me.children()) == 2 and not segments

    wait_until(running, timeout=60, what="the job's workers to attach")
    return coordinator, [c.pid for c in me.children()]


def gone(pids):
    return all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids)


def test_workers_die_with_a_sigkilled_coordinator_and_leave_no_segment():
    coordinator, workers = start_hanging_job()
    coordinator.kill()
    coordinator.wait()
    wait_until(lambda: gone(workers), timeout=30, what="orphaned workers to die")
    assert not [e for e in os.listdir(SHM) if e.startswith(f"mps.{coordinator.pid}.")]


def test_ctrl_c_stops_the_job_and_its_workers():
    coordinator, workers = start_hanging_job()
    coordinator.send_signal(signal.SIGINT)
    _, err = coordinator.communicate(timeout=60)
    assert "KeyboardInterrupt" in err and coordinator.returncode != 0
    wait_until(lambda: gone(workers), timeout=30, what="workers to stop")


def test_memory_stays_flat_when_the_consumer_is_100x_slower():
    """300 MB flow into a consumer that needs 10 ms per 1 MB batch the source makes in ~0.1 ms:
    credit-based backpressure holds every process's resident memory (lag grows, memory does not)."""
    import time

    def slow(batch):
        time.sleep(0.01)  # the work of a slow consumer, not a synchronisation

    p = Pipeline(channel_capacity=1 << 22)
    block = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    (p.from_generator("fast", lambda i, offset: None if offset >= 300 else {"v": block})
      .to_callback("slow", slow, chain=False))  # a process of its own: backpressure across a ring
    samples: dict[int, list[int]] = {}
    running = threading.Event()
    running.set()

    def sample():
        while running.is_set():
            for child in psutil.Process().children():
                try:
                    samples.setdefault(child.pid, []).append(child.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = p.run()
    finally:
        running.clear()
        sampler.join()
    assert result.per_operator()["slow"]["records_in"] == 300 * (1 << 17)
    assert result.per_operator()["fast"]["backpressured_s"] > 1.0  # the source really waited
    for pid, rss in samples.items():
        if len(rss) > 10:
            growth = max(rss) - rss[min(5, len(rss) - 1)]
            assert growth < 48 << 20, f"pid {pid} grew by {growth >> 20} MiB"


def test_drop_policy_sheds_load_and_counts_every_dropped_record():
    import time

    p = Pipeline(channel_capacity=1 << 16)
    block = np.arange(1000)
    (p.from_generator("metrics", lambda i, offset: None if offset >= 2000 else {"v": block})
      .map("slow", lambda b: time.sleep(0.001) or b, backpressure="drop")
      .to_callback("sink", lambda b: None))
    result = p.run()
    stats = result.per_operator()
    assert result.dropped["metrics"] > 0  # counted where the drop happens: at the writer
    assert stats["slow"]["records_in"] + result.dropped["metrics"] == 2000 * 1000


def test_the_leak_check_ignores_segments_of_another_live_job_but_not_orphans():
    """A segment is named after its coordinator's pid: one of a live process outside this
    process tree (pid 1 here) is another job's; one of a dead process is an orphan."""
    from mpstream import testing

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    foreign, orphan = f"{SHM}/mps.1.leaktest.x", f"{SHM}/mps.{dead.pid}.leaktest.x"
    before = testing._segments()
    try:
        for path in (foreign, orphan):
            open(path, "w").close()
        assert testing.leaks(before, wait_s=0).segments == [os.path.basename(orphan)]
    finally:
        for path in (foreign, orphan):
            os.remove(path)


def test_a_none_among_an_operators_output_is_an_error_not_the_end():
    p, s = numbers()
    s.flat_map("split", lambda b: [b.slice(0, 5), None, b.slice(5, 10)]).collect("out")
    with pytest.raises(OperatorError, match="operator 'split' returned list: return a Batch"):
        p.run()


SEGFAULTING_JOB = """
import ctypes, numpy as np
from mpstream import Pipeline, WorkerDiedError

def crash_in_native_code(batch):
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    return batch

p = Pipeline()
p.from_arrays("src", {"x": np.arange(3)}).map("boom", crash_in_native_code).collect("out")
try:
    p.run()
except WorkerDiedError as exc:
    print("RAISED", exc)
"""


def test_a_worker_killed_by_a_fatal_signal_prints_its_python_stack():
    """A crash in native code (SIGSEGV) kills the worker: the job raises WorkerDiedError
    naming the signal, and the worker's Python stack is on stderr (faulthandler)."""
    out = subprocess.run([sys.executable, "-c", SEGFAULTING_JOB], capture_output=True, text=True, timeout=120)
    assert "RAISED operator 'src' (with 'boom'" in out.stdout and "killed by SIGSEGV" in out.stdout
    assert "Fatal Python error: Segmentation fault" in out.stderr and "in crash_in_native_code" in out.stderr


DEV_SHM_FILLS_UP_JOB = textwrap.dedent("""
    import os
    import numpy as np
    from mpstream import OperatorError
    from mpstream.pipeline import Pipeline

    def hog(batch):  # another user of /dev/shm takes all that is left, once the job runs
        if not os.path.exists("/dev/shm/hog"):
            st = os.statvfs("/dev/shm")
            with open("/dev/shm/hog", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
        return batch

    p = Pipeline(channel_capacity=1 << 20)
    (p.from_arrays("src", {"x": np.arange(100_000)}, batch_size=10_000).map("hog", hog)
      .rebalance().map("pass", lambda b: b).collect("out"))
    try:
        p.run()
        print("RAN")
    except OperatorError as exc:
        print("FAILED", str(exc).splitlines()[0])
    finally:
        os.remove("/dev/shm/hog")
    print("LEFT", sorted(os.listdir("/dev/shm")))
""")


@pytest.mark.parametrize("first_record", ["a batch", "the end"])
def test_dev_shm_filling_up_while_a_job_runs_fails_it_naming_the_operator(first_record):
    """The job's rings fit when it starts (checked up front); then /dev/shm fills up before
    the 'hog' operator's output ring reserved its pages: SharedMemoryFullError from the writer
    names the operator, where a store into an unreserved page would have been a SIGBUS. 'hog'
    is chained behind the task's head 'src', and is named also when the first record its ring
    reserves pages for is a control record (a 'hog' that gives no batch sends only the end of
    its stream)."""
    from conftest import run_on_small_tmpfs

    job = DEV_SHM_FILLS_UP_JOB if first_record == "a batch" else \
        DEV_SHM_FILLS_UP_JOB.replace('.map("hog", hog)', '.flat_map("hog", lambda b: [] if hog(b) is not None else [])')
    out = run_on_small_tmpfs(job, SHM, "6m")
    assert out.returncode == 0, out.stderr
    failed, left = out.stdout.splitlines()
    assert failed.startswith("FAILED operator 'hog' instance 0 failed: SharedMemoryFullError: channel"), failed
    assert "ran out while the writer reserved the ring's next pages" in failed
    assert left == "LEFT []"
