"""Suite-wide hygiene: every test must leave no child process, no mpstream segment and no
temporary directory behind, and may not run longer than TEST_DEADLINE_S."""

import multiprocessing
import shutil
import subprocess
import sys
import signal
import time
from collections.abc import Callable

import pytest

from mpstream import testing
from mpstream.checkpoint import CheckpointStore
from mpstream.operators import Operator


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


class DieOnceCheckpointed(Operator):
    """Passes batches on, and SIGKILLs its worker once: at the first batch after a barrier
    whose checkpoint committed and passes ``ready(store, checkpoint)``, after ``last_words()``.
    It holds that batch until the checkpoint committed, so every checkpoint is looked at while
    data still comes, however slowly the disk commits (a map that looked at the newest commit
    per batch could see none before the data ended). Holding is safe there with aligned
    checkpoints: the barrier went on, and the worker's writer thread acknowledges (an
    unaligned one would wait for the held task to copy its in-flight data). After the kill
    it no longer holds."""

    def __init__(self, store: CheckpointStore, crash: testing.Once, ready: Callable[[CheckpointStore, int], bool],
                 last_words: Callable[[], None]) -> None:
        self.store, self.crash, self.ready, self.last_words, self.barrier = store, crash, ready, last_words, None

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> None:
        self.barrier = checkpoint_id

    def process(self, batch):
        if self.barrier is not None and not self.crash.fired:
            checkpoint, self.barrier = self.barrier, None
            wait_until(lambda: checkpoint in self.store.complete(), timeout=60, what=f"checkpoint {checkpoint}")
            if self.ready(self.store, checkpoint) and self.crash():
                self.last_words()
                testing.kill_me()
        return batch


def die_once_checkpointed(tmp_path, chk: str, ready=lambda store, checkpoint: True, last_words=lambda: None):
    """The operator factory of a :class:`DieOnceCheckpointed` (for ``.process``) and its
    :class:`~mpstream.testing.Once` (``fired`` after the kill)."""
    store, crash = CheckpointStore(chk), testing.Once(tmp_path, "crash")
    return (lambda: DieOnceCheckpointed(store, crash, ready, last_words)), crash


def die_once_units_are_checkpointed(tmp_path, chk: str, source: str = "src"):
    """:func:`die_once_checkpointed` once a checkpoint has units done by every instance of
    ``source`` (so a restore has to share out what the others did)."""

    def units_done_by_all(store, checkpoint) -> bool:
        return all(store.read_state(checkpoint, source, i).operator["done"]
                   for i in range(store.instances(checkpoint, source)))

    return die_once_checkpointed(tmp_path, chk, units_done_by_all)
