"""Helpers to test jobs and their failure paths, as Bytewax's testing module does.

* :class:`TestingSource`: yields given batches, one list per instance, and between them the
  markers :class:`Fail`, :class:`Kill` and :class:`Stall` make it raise, die (SIGKILL) or give
  nothing for a while at a chosen position; ``kill_at_checkpoint`` kills it when it takes a
  chosen checkpoint. A source ends after its items, or stays idle (``unbounded=True``).
* :class:`Once`: a flag that fires the first time any process of the job asks, across restarts
  (a file created atomically), so a fault happens once and the restarted job gets through.
* :func:`kill_task` SIGKILLs the process of a task of a running job (:class:`~mpstream.coordinator.JobHandle`);
  :class:`RandomKiller` SIGKILLs random workers of this process at random moments.
* :func:`leaks` / :func:`no_leaks`: worker processes, shared-memory segments and temporary
  directories that a job left behind.

>>> import numpy as np, tempfile
>>> from mpstream import Pipeline
>>> with tempfile.TemporaryDirectory() as d:
...     crash = Once(d, "crash")
...     p = Pipeline()
...     src = p.source("src", lambda: TestingSource([{"x": np.arange(3)}, Kill(crash), {"x": np.arange(3, 5)}]))
...     src.collect("out")
...     import warnings
...     with warnings.catch_warnings():
...         warnings.simplefilter("ignore")   # "restarting the job from its last checkpoint"
...         result = p.run(checkpoint_dir=d + "/chk", checkpoint_interval=0.01)
...     crashed = crash.fired
>>> result["out"]["x"].tolist(), result.restarts, crashed
([0, 1, 2, 3, 4], 1, True)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import psutil

from .batch import Batch
from .channel import SEGMENT_PREFIX, SHM_DIR, creator_pid
from .operators import Output
from .sources import Source

if TYPE_CHECKING:
    from .coordinator import JobHandle

__all__ = ["Once", "Fail", "Kill", "Stall", "TestingSource", "kill_me", "kill_task", "RandomKiller", "leaks",
           "no_leaks", "TEMP_PREFIXES", "InjectedFault"]

#: Prefixes of the temporary directories mpstream's demo, benchmarks and tests create.
TEMP_PREFIXES = ("mpstream-", "mps-")


class InjectedFault(RuntimeError):
    """The exception a :class:`Fail` marker raises."""


class Once:
    """A flag shared by every process of a job and its restarts: ``once()`` is True for the
    first caller only. It is a file in ``directory`` (created with O_EXCL)."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.path = os.path.join(os.fspath(directory), f"once.{name}")

    def __call__(self) -> bool:
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

    @property
    def fired(self) -> bool:
        return os.path.exists(self.path)


def kill_me() -> None:
    """SIGKILLs the calling process (a worker dying mid-work)."""
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Fail:
    """At this position: raise :class:`InjectedFault` the first time ``once`` fires."""

    once: Once


@dataclass(frozen=True)
class Kill:
    """At this position: SIGKILL the worker the first time ``once`` fires."""

    once: Once


@dataclass(frozen=True)
class Stall:
    """At this position: give nothing (an idle source) until ``until()`` is true."""

    until: Callable[[], bool]


Item = Union[Batch, Mapping[str, Any], Fail, Kill, Stall]


class TestingSource(Source):
    """Instance i yields ``partitions[i]``'s batches in order (an instance without a partition
    has none) and acts on the markers between them. Its position is the index of its next
    item, so a restore replays from there. After its items it ends, or with ``unbounded``
    stays idle until the job is stopped. ``kill_at_checkpoint=(n, once)`` SIGKILLs it while it
    takes checkpoint n (after its barrier was requested), the first time ``once`` fires."""

    __test__ = False  # not a pytest test class

    def __init__(self, *partitions: Sequence[Item], unbounded: bool = False,
                 kill_at_checkpoint: tuple[int, Once] | None = None) -> None:
        self.partitions, self.unbounded, self.kill_at_checkpoint = partitions, unbounded, kill_at_checkpoint
        self.position = 0

    def _items(self) -> Sequence[Item]:
        return self.partitions[self.ctx.instance] if self.ctx.instance < len(self.partitions) else ()

    def poll(self) -> Output:
        items = self._items()
        while self.position < len(items):
            item = items[self.position]
            if isinstance(item, Stall):
                if not item.until():
                    return None
            elif isinstance(item, Fail):
                if item.once():
                    raise InjectedFault(f"source {self.ctx.name!r} instance {self.ctx.instance}: injected failure "
                                        f"at position {self.position}")
            elif isinstance(item, Kill):
                if item.once():
                    kill_me()
            else:
                self.position += 1
                return item
            self.position += 1
        if self.unbounded:
            return None
        raise StopIteration

    def next_awake(self) -> float | None:
        return time.time() + 0.02  # stalled or idle: look again soon

    def has_input(self) -> bool:
        return self.ctx.instance < len(self.partitions)

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        if self.kill_at_checkpoint is not None:
            n, once = self.kill_at_checkpoint
            if checkpoint_id == n and once():
                kill_me()
        return None

    def snapshot(self) -> Any:
        return self.position

    def restore(self, states: list[Any]) -> None:
        self.position = states[0]


def kill_task(job: JobHandle, task: str) -> int:
    """SIGKILLs the process running ``task`` (e.g. ``"agg[1]"``) of a running job; its pid."""
    pid = job.workers()[task]
    os.kill(pid, signal.SIGKILL)
    return pid


class RandomKiller:
    """SIGKILLs ``count`` random worker processes of this process at random moments (every
    0.05 to 0.3 s) while it is entered: fault injection for a job ``run()`` in this thread."""

    def __init__(self, count: int, seed: int = 1) -> None:
        self.count, self.kills, self.rng = count, 0, random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while self.kills < self.count and not self._stop.wait(self.rng.uniform(0.05, 0.3)):
            workers = [c for c in me.children() if c.status() != psutil.STATUS_ZOMBIE]
            if workers:
                try:
                    os.kill(self.rng.choice(workers).pid, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def __enter__(self) -> RandomKiller:
        if self.count:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.count:
            self._thread.join()


# ---- leaks ------------------------------------------------------------------------------------

def _segments() -> set[str]:
    """mpstream's segments, except those of another running job: a segment is named after the
    pid of the coordinator that made it, and one of a live process outside this process tree
    (another user's job beside a test suite) is not this process's to answer for."""
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.children(recursive=True))}

    def foreign(entry: str) -> bool:
        pid = creator_pid(entry)
        return pid is not None and pid not in ours and psutil.pid_exists(pid)

    return {e for e in os.listdir(SHM_DIR) if e.startswith(SEGMENT_PREFIX) and not foreign(e)}


def _temp_dirs() -> set[str]:
    return {e for e in os.listdir(tempfile.gettempdir()) if e.startswith(TEMP_PREFIXES)}


def _children(wait_s: float) -> list[psutil.Process]:
    """Child processes still running after wait_s (exiting ones get that long); not
    multiprocessing's resource tracker, which the spawn start method keeps for the session."""
    def ours(p: psutil.Process) -> bool:
        try:
            return "resource_tracker" not in " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            return False
    multiprocessing.active_children()  # reaps finished multiprocessing children
    children = [p for p in psutil.Process().children(recursive=True) if ours(p)]
    _, alive = psutil.wait_procs(children, timeout=wait_s)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@dataclass
class Leaks:
    """What is left: running child processes, /dev/shm segments and temporary directories."""

    processes: list[psutil.Process]
    segments: list[str]
    temp_dirs: list[str]

    def __bool__(self) -> bool:
        return bool(self.processes or self.segments or self.temp_dirs)

    def clean(self) -> None:
        """Kills the processes and removes the segments and directories."""
        import shutil

        for p in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for entry in self.segments:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, entry))
        for entry in self.temp_dirs:
            shutil.rmtree(os.path.join(tempfile.gettempdir(), entry), ignore_errors=True)


def leaks(segments_before: set[str] = frozenset(), temp_dirs_before: set[str] = frozenset(),
          wait_s: float = 5.0) -> Leaks:
    """Child processes of this process still running (after giving exiting ones wait_s), and
    the mpstream segments and temporary directories that were not in the ``*_before`` sets."""
    return Leaks(_children(wait_s), sorted(_segments() - segments_before), sorted(_temp_dirs() - temp_dirs_before))


@contextlib.contextmanager
def no_leaks(wait_s: float = 5.0) -> Iterator[None]:
    """Fails (AssertionError) if the block leaves a worker process, a shared-memory segment
    or a temporary directory of mpstream's behind; cleans them up either way."""
    segments, temp_dirs = _segments(), _temp_dirs()
    yield
    left = leaks(segments, temp_dirs, wait_s)
    left.clean()
    assert not left.processes, f"left child processes running: {left.processes}"
    assert not left.segments, f"left shared-memory segments: {left.segments}"
    assert not left.temp_dirs, f"left temporary directories: {left.temp_dirs}"
