"""Suite-wide hygiene: every test must leave no child process, no mpstream segment and no
temporary directory behind, and may not run longer than TEST_DEADLINE_S."""

import multiprocessing
import shutil
import subprocess
import sys
import signal
import time

import pytest

from mpstream import testing


TEST_DEADLINE_S = 180


@pytest.fixture(autouse=True)
def deadline():
    """A hung test fails after TEST_DEADLINE_S instead of stalling the suite (and CI)."""

    def expire(signum, frame):
        raise TimeoutError(f"test still running after {TEST_DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_DEADLINE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def no_leaks():
    """Fails the test that leaves an orphan process, a /dev/shm segment or a temporary
    directory of mpstream's behind (see mpstream.testing.no_leaks)."""
    with testing.no_leaks():
        yield


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Polls predicate until true: synchronises on a condition, never on elapsed time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@pytest.fixture(params=["fork", "spawn"])
def mp_context(request):
    """A multiprocessing context for each start method mpstream supports."""
    return multiprocessing.get_context(request.param)


#: The first line of a ``python -c`` script a test sends Ctrl-C (SIGINT): KeyboardInterrupt
#: there, whatever this process has. A shell starts background jobs with SIGINT ignored, their
#: children inherit that, and Python leaves an ignored SIGINT ignored: a test run started with
#: ``&`` would otherwise find its Ctrl-C lost. (Not a ``preexec_fn``: unsafe with threads.)
CTRL_C = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def run_on_small_tmpfs(script: str, mountpoint: str, size: str) -> subprocess.CompletedProcess:
    """Runs python -c script (argv[1] = mountpoint) with a tmpfs of size mounted on mountpoint
    in a private mount namespace: a real full disk. Skips the test where unshare needs root."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare --mount (root) to mount a small tmpfs")
    inner = f'mount -t tmpfs -o size={size} tmpfs "$1" && exec {sys.executable} -c "$0" "$1"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", inner, script, mountpoint],
                          capture_output=True, text=True, timeout=120)


def die_once_units_are_checkpointed(tmp_path, chk: str, source: str = "src"):
    """A map that SIGKILLs its worker once, when the newest complete checkpoint has units
    done by every instance of ``source`` (so a restore has to share out what the others did).
    Returns the map and its :class:`~mpstream.testing.Once` (``fired`` after the kill)."""
    from mpstream.checkpoint import CheckpointStore

    store, crash, checked = CheckpointStore(chk), testing.Once(tmp_path, "crash"), set()

    def die(batch):
        newest = (store.complete() or [None])[-1]
        if newest is not None and newest not in checked:
            checked.add(newest)
            states = [store.read_state(newest, source, i).operator for i in range(store.instances(newest, source))]
            if all(s["done"] for s in states) and crash():
                testing.kill_me()
        return batch

    return die, crash
