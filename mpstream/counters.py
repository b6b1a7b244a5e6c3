"""A running job's live counters: one small shared-memory segment, the job's *board*.

The coordinator creates the board when a job starts, in /dev/shm, and unlinks its name at
once: it keeps the file open, and others reach it as ``/proc/<coordinator pid>/fd/<fd>``
(:func:`find_boards` looks for those). So the board goes with the coordinator's process
whatever happens to it, a SIGKILL included, and nothing is ever left in /dev/shm. Every task writes its own slots: its operators' counters about four times a second,
and its waits (:class:`~mpstream.channel.WaitClock`) as they begin and end, all as plain stores
to memory, without a system call. Readers (``mpstream top``, the metrics endpoint, the job's
timeline, progress bars) map the board read-only and copy it: they never disturb the job.

Layout: little-endian int64 words::

    header   magic, layout version, coordinator pid, started (unix ns), tasks, operators,
             state, restarts, last restart (unix ns), checkpoints completed, last checkpoint
             id, its completion (unix ns), its duration (ns), metadata offset, metadata length
    tasks    per task (process): the WaitClock's 5 words (sequence, waiting for, since,
             input ns, credit ns), pid, started (monotonic ns), input fill (parts per
             million), ended (monotonic ns; 0 while it runs)
    ops      per operator instance: records in, records out, batches in, batches out,
             bytes out, dropped, late records, watermark
    metadata JSON: the job's name, its tasks, and each operator instance's name, instance
             and task

Times that are ``monotonic`` are ``time.monotonic_ns()``: one clock for every process. A task
that starts again (a restart) sets its words afresh: readers tell attempts apart by its start.

>>> board = Board.create("example", ["src[0]"], [("src", 0, 0)])
>>> task = board.task(0, [0])
>>> board.snapshot().operators[0].records_out
0
>>> from mpstream.metrics import InstanceStats
>>> task.publish([InstanceStats("src", 0, records_out=5)], fill=0.0)
>>> job = board.snapshot()
>>> job.name, job.operators[0].name, job.operators[0].records_out
('example', 'src', 5)
>>> board.close()
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .channel import SHM_DIR, WaitClock, creator_pid, segment_name
from .errors import SharedMemoryFullError
from .metrics import InstanceStats

__all__ = ["Board", "TaskCounters", "JobCounters", "OperatorCounters", "Rates", "find_boards", "rates"]

MAGIC = 0x44524F4253504D  # "MPSBORD" little-endian
VERSION = 1
SUFFIX = ".counters"
HEADER_WORDS, TASK_WORDS, OP_WORDS = 16, 16, 8
RUNNING, FINISHED, FAILED = 1, 2, 3
STATES = {RUNNING: "running", FINISHED: "finished", FAILED: "failed"}
NO_WATERMARK = -(2 ** 63)
(_MAGIC, _VERSION, _PID, _STARTED, _TASKS, _OPS, _STATE, _RESTARTS, _RESTARTED_AT, _CHECKPOINTS,
 _CHECKPOINT_ID, _CHECKPOINT_AT, _CHECKPOINT_NS, _META_AT, _META_LENGTH) = range(15)
_CLOCK = WaitClock.WORDS
_PID_W, _STARTED_W, _FILL_W, _ENDED_W = _CLOCK, _CLOCK + 1, _CLOCK + 2, _CLOCK + 3  # after the WaitClock's words
_labels = itertools.count()


@dataclass
class OperatorCounters:
    """One operator instance as the board shows it. The times are its task's (process's):
    operators chained in one process share them. ``busy_s`` is the task's running time
    neither waiting for input nor for credit."""

    name: str
    instance: int
    task: str
    pid: int
    records_in: int
    records_out: int
    batches_in: int
    batches_out: int
    bytes_out: int
    dropped: int
    late: int
    watermark: int | None
    busy_s: float
    idle_s: float
    backpressured_s: float
    waiting: str  # what its task waits for now: "", "input" or "credit"
    input_fill: float  # the fullest input ring of its task, 0 to 1
    started: float = 0.0  # when its task's attempt started (time.monotonic()): a restart changes it


@dataclass
class JobCounters:
    """A copy of a board taken at ``taken`` (``time.monotonic()``)."""

    name: str
    path: str
    pid: int
    started: float  # unix time
    taken: float
    state: str
    restarts: int
    restarted_at: float | None  # unix time of the last restart
    checkpoints: int
    last_checkpoint: dict[str, Any] | None  # id, at (unix time), duration_s
    operators: list[OperatorCounters] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The job's own fields (not its operators) as JSON values."""
        return {"job": self.name, "pid": self.pid, "started": self.started, "state": self.state,
                "restarts": self.restarts, "checkpoints": self.checkpoints,
                "last_checkpoint": self.last_checkpoint, "board": self.path}


@dataclass
class Rates:
    """What an operator instance did between two snapshots: records per second and the
    shares (0 to 1) of the time its process was busy, idle or backpressured."""

    counters: OperatorCounters
    records_in_per_s: float
    records_out_per_s: float
    busy: float
    idle: float
    backpressured: float


def rates(before: JobCounters, after: JobCounters) -> list[Rates]:
    """Per operator instance of ``after``: its rates since ``before`` (an instance that
    started again since, after a restart, counts from zero)."""
    seconds = max(after.taken - before.taken, 1e-9)
    earlier = {(o.name, o.instance): o for o in before.operators}
    out = []
    for op in after.operators:
        prev = earlier.get((op.name, op.instance))
        if prev is not None and prev.started != op.started:
            prev = None

        def delta(field_name: str, prev: OperatorCounters | None = prev, op: OperatorCounters = op) -> float:
            return getattr(op, field_name) - (0 if prev is None else getattr(prev, field_name))

        times = [max(0.0, delta(f)) for f in ("busy_s", "idle_s", "backpressured_s")]
        total = sum(times) or 1.0
        out.append(Rates(op, delta("records_in") / seconds, delta("records_out") / seconds,
                         *(t / total for t in times)))
    return out


class TaskCounters:
    """A task's slots of the board: its wait clock and its operators' counters."""

    def __init__(self, board: Board, task: int, operators: list[int]) -> None:
        words = board.task_words(task)
        words[_STARTED_W] = 0  # first: readers skip the task while its words are set afresh
        for i in range(TASK_WORDS):  # this attempt starts from zero
            words[i] = 0
        words[_PID_W] = os.getpid()
        self.clock = WaitClock(words[:_CLOCK])
        board._views.append(self.clock)  # released at the board's close
        self._words = words
        self._ops = [board.op_words(i) for i in operators]
        for op in self._ops:
            for i in range(OP_WORDS):
                op[i] = 0
            op[7] = NO_WATERMARK
        words[_STARTED_W] = time.monotonic_ns()
        self.board = board  # keeps the mapping alive

    def publish(self, stats: list[InstanceStats], fill: float) -> None:
        """Writes the operators' counters (in the order the task was given them) and the
        fill of the task's fullest input ring."""
        for words, s in zip(self._ops, stats):
            words[0], words[1], words[2], words[3] = s.records_in, s.records_out, s.batches_in, s.batches_out
            words[4], words[5] = s.bytes_out, s.dropped
            words[6] = s.counters.get("late_records_dropped", 0)
            words[7] = NO_WATERMARK if s.watermark is None else s.watermark
        self._words[_FILL_W] = int(fill * 1e6)

    def end(self) -> None:
        """The task ends: its time stops here."""
        self._words[_ENDED_W] = time.monotonic_ns()


class Board:
    """A job's counters board (see the module doc): ``Board.create`` in the coordinator
    (which owns and removes it), ``Board.open`` in a task, ``Board.read`` anywhere."""

    def __init__(self, path: str, buffer: mmap.mmap, fd: int | None = None, writable: bool = True) -> None:
        self.path, self._mmap, self._fd = path, buffer, fd
        self.words = memoryview(buffer).cast("q") if writable else None
        self._views: list[memoryview | WaitClock] = []  # handed out: released at close
        self._reading = memoryview(buffer).cast("q")  # read-only where the mapping is
        self._clocks: dict[int, tuple[list[int], int]] = {}  # each task's last consistent clock words, taken
        self._lock = threading.Lock()  # snapshot (a metrics scrape's thread) against close
        self._last: JobCounters | None = None
        header = np.frombuffer(buffer, np.int64, HEADER_WORDS)
        if header[_MAGIC] != MAGIC or header[_VERSION] != VERSION:
            raise ValueError(f"{path} is not an mpstream counters board of layout version {VERSION}")
        self.tasks, self.ops = int(header[_TASKS]), int(header[_OPS])
        at, length = int(header[_META_AT]), int(header[_META_LENGTH])
        self.meta = json.loads(bytes(buffer[at : at + length]))


    @classmethod
    def create(cls, job: str, tasks: list[str], operators: list[tuple[str, int, int]]) -> Board:
        """A new board for a job of these tasks and operator instances (name, instance, task)."""
        meta = json.dumps({"job": job, "tasks": tasks, "operators": operators}).encode()
        meta_at = 8 * (HEADER_WORDS + TASK_WORDS * len(tasks) + OP_WORDS * len(operators))
        length = -(-(meta_at + len(meta)) // 8) * 8
        name = SHM_DIR + segment_name(f"{next(_labels)}{SUFFIX}")
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.unlink(name)  # the open file is the board from now on
        try:
            os.posix_fallocate(fd, 0, length)  # ENOSPC now, not SIGBUS at a store
            buffer = mmap.mmap(fd, length)
        except OSError as exc:
            os.close(fd)
            raise SharedMemoryFullError(f"the job's counters board needs {length} bytes of {SHM_DIR}: {exc}; "
                                        f"remove stale segments or enlarge {SHM_DIR}") from exc
        words = memoryview(buffer).cast("q")
        values = {_PID: os.getpid(), _STARTED: time.time_ns(), _TASKS: len(tasks), _OPS: len(operators),
                  _STATE: RUNNING, _META_AT: meta_at, _META_LENGTH: len(meta), _VERSION: VERSION}
        for index, value in values.items():
            words[index] = value
        buffer[meta_at : meta_at + len(meta)] = meta
        words[_MAGIC] = MAGIC  # last: a reader that sees it sees the rest
        words.release()
        return cls(f"/proc/{os.getpid()}/fd/{fd}", buffer, fd)

    @classmethod
    def open(cls, path: str) -> Board:
        """Maps the board at path (its ``path``: ``/proc/<pid>/fd/<fd>``) read-write, in a task."""
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(path, mmap.mmap(fd, 0))
        finally:
            os.close(fd)

    @classmethod
    def read(cls, path: str) -> JobCounters | None:
        """A snapshot of the board at path; None when it is gone or not a board of a live job."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            buffer = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        except (OSError, ValueError):  # empty: being created
            return None
        finally:
            os.close(fd)
        try:
            board = cls(path, buffer, writable=False)
        except (ValueError, UnicodeDecodeError):
            return None
        return board.snapshot()

    def _view(self, start: int, length: int) -> memoryview:
        view = self.words[start : start + length]
        self._views.append(view)
        return view

    def task_words(self, task: int) -> memoryview:
        """The words of task number ``task`` (see the module doc)."""
        return self._view(HEADER_WORDS + TASK_WORDS * task, TASK_WORDS)

    def op_words(self, op: int) -> memoryview:
        """The words of operator instance number ``op`` (in the order of the metadata)."""
        return self._view(HEADER_WORDS + TASK_WORDS * self.tasks + OP_WORDS * op, OP_WORDS)

    def task(self, task: int, operators: list[int]) -> TaskCounters:
        """The slots a task writes: its own and its operators' (numbers in the metadata)."""
        return TaskCounters(self, task, operators)

    def end_task(self, task: int) -> None:
        """The coordinator saw the task's process end (killed, or exited): its time stops."""
        words = self.words
        at = HEADER_WORDS + TASK_WORDS * task
        if words[at + _STARTED_W] and not words[at + _ENDED_W]:
            words[at + _ENDED_W] = time.monotonic_ns()

    # ---- the coordinator's fields ----------------------------------------------------------

    def set(self, **fields: int) -> None:
        """Sets header fields: state, restarts, restarted_at, checkpoints, checkpoint_id,
        checkpoint_at, checkpoint_ns."""
        index = {"state": _STATE, "restarts": _RESTARTS, "restarted_at": _RESTARTED_AT,
                 "checkpoints": _CHECKPOINTS, "checkpoint_id": _CHECKPOINT_ID, "checkpoint_at": _CHECKPOINT_AT,
                 "checkpoint_ns": _CHECKPOINT_NS}
        for name, value in fields.items():
            self.words[index[name]] = value

    def close(self) -> None:
        """Closes the creator's file and mapping: readers no longer find the board (other
        processes' mappings stay valid; the memory goes with the last). A snapshot asked
        for after is the last one taken."""
        with self._lock:
            if self._fd is None:
                return
            os.close(self._fd)
            self._fd = None
            for view in self._views + [self.words, self._reading]:
                if view is not None:
                    view.release()
            self._mmap.close()  # and the descriptor mmap keeps of its own

    # ---- reading ---------------------------------------------------------------------------

    def snapshot(self) -> JobCounters:
        """A copy of the board now, as :class:`JobCounters`."""
        with self._lock:
            if self._mmap.closed:
                return self._last
            self._last = self._snapshot()
            return self._last

    def _copy(self) -> tuple[np.ndarray, int, list[int]]:
        """The board's words, each task's WaitClock consistent (read under its seqlock), and
        the time before they were read: what a wait went on for after it is counted only when
        the wait ended, so no later copy shows less waited. Per task, the time its clock
        words stand for: a task whose words changed all the while is shown as last seen."""
        taken = time.monotonic_ns()
        count = HEADER_WORDS + TASK_WORDS * self.tasks + OP_WORDS * self.ops
        words = np.frombuffer(self._mmap, np.int64, count).copy()
        reading = self._reading
        times = []
        for task in range(self.tasks):
            at = HEADER_WORDS + TASK_WORDS * task
            for _ in range(100):  # a wait's words change in well under a microsecond
                sequence = reading[at]
                clock = reading[at : at + _CLOCK].tolist()
                if not sequence & 1 and reading[at] == sequence == clock[0]:
                    self._clocks[task] = clock, taken
                    break
            # changing all the while: as last seen (a reader never sees time go back)
            clock, when = self._clocks.get(task, ([0] * _CLOCK, taken))
            words[at : at + _CLOCK] = clock
            times.append(when)
        return words, taken, times

    def _snapshot(self) -> JobCounters:
        words, taken, times_at = self._copy()
        header = words[:HEADER_WORDS]
        tasks = words[HEADER_WORDS : HEADER_WORDS + TASK_WORDS * self.tasks].reshape(self.tasks, TASK_WORDS)
        ops = words[HEADER_WORDS + TASK_WORDS * self.tasks :].reshape(self.ops, OP_WORDS)
        times = [_task_times(row, at) for row, at in zip(tasks, times_at)]
        operators = []
        for (name, instance, task), row in zip(self.meta["operators"], ops):
            busy, idle, credit, waiting = times[task]
            operators.append(OperatorCounters(
                name, instance, self.meta["tasks"][task], int(tasks[task][_PID_W]), *(int(v) for v in row[:7]),
                None if row[7] == NO_WATERMARK else int(row[7]), busy, idle, credit, waiting,
                tasks[task][_FILL_W] / 1e6, tasks[task][_STARTED_W] / 1e9))
        checkpoint = None if not header[_CHECKPOINTS] else {
            "id": int(header[_CHECKPOINT_ID]), "at": header[_CHECKPOINT_AT] / 1e9,
            "duration_s": header[_CHECKPOINT_NS] / 1e9}
        return JobCounters(self.meta["job"], self.path, int(header[_PID]), header[_STARTED] / 1e9, taken / 1e9,
                           STATES.get(int(header[_STATE]), "unknown"), int(header[_RESTARTS]),
                           header[_RESTARTED_AT] / 1e9 if header[_RESTARTS] else None, int(header[_CHECKPOINTS]),
                           checkpoint, operators)


def _task_times(row: np.ndarray, now: int) -> tuple[float, float, float, str]:
    """(busy, idle, backpressured) seconds of a task so far (until it ended), and what it
    waits for now."""
    if not row[_STARTED_W]:  # not started (yet) in this attempt
        return 0.0, 0.0, 0.0, ""
    if row[_ENDED_W]:
        now = min(now, int(row[_ENDED_W]))
    waiting, since = int(row[1]), int(row[2])
    waited = [int(row[3]), int(row[4])]
    if waiting in (WaitClock.INPUT, WaitClock.CREDIT):
        waited[waiting - 1] += max(0, now - since)
    idle, credit = waited[0] / 1e9, waited[1] / 1e9
    busy = max(0.0, (now - int(row[_STARTED_W])) / 1e9 - idle - credit)
    ended = bool(row[_ENDED_W])
    return busy, idle, credit, "" if ended else {WaitClock.INPUT: "input", WaitClock.CREDIT: "credit"}.get(waiting, "")


def find_boards() -> list[str]:
    """The paths (``/proc/<pid>/fd/<fd>``) of the boards of the jobs running on this machine
    that this user may read: files a coordinator created as a board and keeps open. Its
    forked tasks hold the same file open: only the creator's descriptor counts."""
    found: dict[tuple[int, str], str] = {}
    for pid in sorted((int(p) for p in os.listdir("/proc") if p.isdigit())):
        fds = f"/proc/{pid}/fd"
        try:
            entries = os.listdir(fds)
        except OSError:  # gone, or another user's
            continue
        for fd in entries:
            try:
                target = os.readlink(f"{fds}/{fd}")
            except OSError:
                continue
            entry = os.path.basename(target).removesuffix(" (deleted)")
            if target.startswith(SHM_DIR + "/") and entry.endswith(SUFFIX) and creator_pid(entry) == pid:
                found.setdefault((pid, target), f"{fds}/{fd}")  # mmap holds a descriptor of its own
    return list(found.values())
