"""Suite-wide hygiene: every test must leave no child process and no mpstream segment behind."""

import multiprocessing
import os
import shutil
import subprocess
import sys
import signal
import tempfile
import time

import psutil
import pytest

from mpstream.channel import SEGMENT_PREFIX, SHM_DIR


def _segments() -> set[str]:
    return {e for e in os.listdir(SHM_DIR) if e.startswith(SEGMENT_PREFIX)}


#: Prefixes of the temporary directories mpstream's demo, benchmarks and tests may create.
TEMP_PREFIXES = ("mpstream-", "mps-")


def _temp_dirs() -> set[str]:
    return {e for e in os.listdir(tempfile.gettempdir()) if e.startswith(TEMP_PREFIXES)}


def _is_ours(p: psutil.Process) -> bool:
    """Not multiprocessing's own resource tracker, which spawn starts once for the session."""
    try:
        return "resource_tracker" not in " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return False


def _reap_children(deadline_s: float) -> list[psutil.Process]:
    """Children still alive after deadline_s (exiting ones get that long to finish)."""
    children = [p for p in psutil.Process().children(recursive=True) if _is_ours(p)]
    _, alive = psutil.wait_procs(children, timeout=deadline_s)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


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
    directory of mpstream's behind (and cleans up)."""
    before, temp_before = _segments(), _temp_dirs()
    yield
    multiprocessing.active_children()  # reaps finished multiprocessing children
    orphans = _reap_children(5.0)
    for p in orphans:
        p.kill()
    leaked = _segments() - before
    for entry in leaked:
        os.unlink(os.path.join(SHM_DIR, entry))
    left = _temp_dirs() - temp_before
    for entry in left:
        shutil.rmtree(os.path.join(tempfile.gettempdir(), entry), ignore_errors=True)
    assert not orphans, f"test left child processes running: {orphans}"
    assert not leaked, f"test left shared-memory segments: {sorted(leaked)}"
    assert not left, f"test left temporary directories: {sorted(left)}"


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


def run_on_small_tmpfs(script: str, mountpoint: str, size: str) -> subprocess.CompletedProcess:
    """Runs python -c script (argv[1] = mountpoint) with a tmpfs of size mounted on mountpoint
    in a private mount namespace: a real full disk. Skips the test where unshare needs root."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare --mount (root) to mount a small tmpfs")
    inner = f'mount -t tmpfs -o size={size} tmpfs "$1" && exec {sys.executable} -c "$0" "$1"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", inner, script, mountpoint],
                          capture_output=True, text=True, timeout=120)
