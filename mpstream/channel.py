"""Channels: one single-producer / single-consumer ring in a POSIX shared-memory segment.

Ownership is explicit. The process that creates a :class:`Channel` owns the segment's name and
unlinks it (``close()``, or leaving its ``with`` block); writers and readers in other processes
attach by name and detach with ``close()``. An attached process keeps its mapping until its last
view is gone, so an unlink never pulls memory from under a reader.

>>> import numpy as np
>>> with Channel("example", capacity=1 << 16) as chan:
...     writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
...     writer.write(Batch({"x": np.arange(3)}))
...     writer.close()
...     with reader.read() as record:
...         total = int(record.batch["x"].sum())
...     with reader.read() as record:
...         end = record.kind
...     reader.close()
>>> total, end
(3, <RecordKind.END_OF_STREAM: 4>)

Segment names are ``/mps.<creator pid>.<run token>.<label>``: :func:`sweep_stale_segments`
removes those whose creator is gone.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import re
import secrets
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import psutil

from ._mps import ffi, lib
from .batch import Batch, Frame
from .errors import (
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    LayoutError,
    PeerDiedError,
    RecordTooLargeError,
    SharedMemoryFullError,
)

__all__ = [
    "Channel",
    "ChannelWriter",
    "ChannelReader",
    "InputGate",
    "LookAhead",
    "Record",
    "RecordKind",
    "sweep_stale_segments",
    "SHM_DIR",
    "Doorbells",
    "Doorbell",
    "SharedCounters",
    "WaitClock",
]

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "mps."
DEFAULT_CAPACITY = 1 << 22
#: Longest a single C call stays parked (a signal wakes it anyway: Python then runs its handler).
_SLICE_NS = 1_000_000_000
#: Nanoseconds a blocking call spins (at most its timeout) before it parks on the futex (see
#: bench/transport.py).
DEFAULT_SPIN_NS = 50_000
#: How long a parked call sleeps before it checks that its peer lives (0: the C default,
#: MPS_RING_NAP_NS = 20 ms). Every wake-up costs CPU: mpstream's tasks, whose coordinator
#: notices a dead process at once and stops the others, nap a second.
DEFAULT_NAP_NS = 0
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_RUN_TOKEN = secrets.token_hex(4)


class RecordKind(enum.IntEnum):
    """What a record carries. The values are the ring's record types (csrc/mps_ring.h)."""

    DATA = lib.MPS_RECORD_DATA
    BARRIER = lib.MPS_RECORD_BARRIER
    WATERMARK = lib.MPS_RECORD_WATERMARK
    STATUS = lib.MPS_RECORD_STATUS
    END_OF_STREAM = lib.MPS_RECORD_END_OF_STREAM


_KINDS = {kind.value: kind for kind in RecordKind}
_DATA_KIND = RecordKind.DATA
_OK, _EMPTY, _FULL = lib.MPS_RING_OK, lib.MPS_RING_EMPTY, lib.MPS_RING_FULL
_TIMEOUT, _INTERRUPTED = lib.MPS_RING_TIMEOUT, lib.MPS_RING_INTERRUPTED
_SCHEMA, _DATA = lib.MPS_RECORD_SCHEMA, lib.MPS_RECORD_DATA


def segment_name(label: str) -> str:
    """The shm name of a channel labelled label, created by this process."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:150]
    return f"/{SEGMENT_PREFIX}{os.getpid()}.{_RUN_TOKEN}.{safe}"


def creator_pid(entry: str) -> int | None:
    """The pid of the process that created the segment named entry (None: not mpstream's)."""
    match = re.match(re.escape(SEGMENT_PREFIX) + r"(\d+)\.", entry)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sweep_stale_segments() -> list[str]:
    """Unlinks every mpstream segment whose creating process is gone; returns their names.

    A job that was SIGKILLed cannot unlink its segments; a new job calls this at start.
    """
    swept = []
    for entry in sorted(os.listdir(SHM_DIR)):
        pid = creator_pid(entry)
        if pid is not None and not _alive(pid):
            if lib.mps_segment_unlink(f"/{entry}".encode()) == 0:
                swept.append(entry)
    return swept


def check_free_space(what: str, length: int) -> None:
    """Raises :class:`SharedMemoryFullError` unless /dev/shm has ``length`` bytes free for
    ``what`` (e.g. "channel 'a->b'"): rings reserve their memory as they fill, so whoever
    creates a job's channels checks that all of them fit at full capacity."""
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if length > free:
        raise _full_error(what, length, free)


def _full_error(what: str, length: int, free: int | None) -> SharedMemoryFullError:
    have = "has too little space" if free is None else f"has {free / 2**20:.1f} MiB free"
    return SharedMemoryFullError(
        f"{what} needs {length / 2**20:.1f} MiB of shared memory but {SHM_DIR} {have}: "
        f"give channels a smaller capacity, remove stale segments "
        f"(mpstream.channel.sweep_stale_segments()), or enlarge {SHM_DIR} (docker run --shm-size)"
    )


class _Mapping:
    """A mapped segment in this process. ``base`` anchors one reference to the C segment and
    every numpy view reaches it through ``buffer``; attached ring handles hold their own. The
    segment is unmapped after the last of these is gone, in whatever order they are freed."""

    __slots__ = ("segment", "base", "length", "buffer")

    def __init__(self, segment: Any) -> None:
        self.segment = segment  # borrowed pointer: valid while base lives
        self.length = segment.length
        self.base = ffi.gc(ffi.cast("uint8_t *", segment.base), lambda _, s=segment: lib.mps_segment_release(s))
        self.buffer = ffi.buffer(self.base, self.length)

    @classmethod
    def open(cls, name: str) -> _Mapping:
        out = ffi.new("struct mps_segment **")
        err = lib.mps_segment_open(name.encode(), out)
        if err:
            raise ChannelError(f"cannot open channel segment {name!r}: {os.strerror(err)}; "
                               f"is the job that created it still running?")
        return cls(out[0])


class Channel:
    """Creates and owns one channel segment; ``close()`` unlinks it (once, in the creator).

    capacity is the ring's size in bytes (a power of two, >= 1024); a record holds at most half
    of it. max_records, when not 0, also bounds the records in flight (credits).
    Raises :class:`SharedMemoryFullError` up front when /dev/shm has less free than the
    segment's size. The ring's memory is reserved as the writer's records first reach it (see
    ``csrc/mps_ring.h``, "Memory"): a writer that finds /dev/shm full by then gets
    :class:`SharedMemoryFullError` too, never a SIGBUS.
    """

    def __init__(self, label: str, capacity: int = DEFAULT_CAPACITY, max_records: int = 0,
                 *, start_position: int = 0, check_space: bool = True) -> None:
        if capacity < lib.MPS_RING_MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"channel {label!r}: capacity must be a power of two >= "
                             f"{lib.MPS_RING_MIN_CAPACITY}, got {capacity}")
        self.label = label
        self.name = segment_name(label)
        self.capacity = capacity
        length = self.segment_length(capacity)
        if check_space:
            check_free_space(f"channel {label!r}", length)
        out = ffi.new("struct mps_segment **")
        err = lib.mps_segment_create(self.name.encode(), length, lib.MPS_RING_DATA_OFFSET, out)
        if err == errno.ENOSPC:
            raise _full_error(f"channel {label!r}", length, None)
        if err:
            raise ChannelError(f"cannot create channel {label!r} ({self.name}): {os.strerror(err)}")
        self._owner_pid = os.getpid()
        lib.mps_ring_init(out[0].base, capacity, max_records, start_position)
        lib.mps_segment_release(out[0])

    @staticmethod
    def segment_length(capacity: int) -> int:
        """The bytes of shared memory a channel of this capacity takes once full."""
        return lib.mps_ring_segment_length(capacity)

    def close(self) -> None:
        """Unlinks the segment name. Attached processes keep their mappings until they detach."""
        if self._owner_pid == os.getpid():
            lib.mps_segment_unlink(self.name.encode())
            self._owner_pid = 0

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Channel({self.label!r}, capacity={self.capacity}, name={self.name!r})"


class WaitClock:
    """The time a process waits on channels (and on anything else it parks on), by reason,
    kept in five int64 words where another process can read them while it waits: a sequence
    number, the reason of the wait going on now (0: none), when it began
    (``time.monotonic_ns()``), and the nanoseconds waited so far for input and for credit. The
    words are its own, or a slot of a job's counters board (:mod:`mpstream.counters`). Only
    the slow path of a wait touches them: a wait goes on from when a blocking call's first
    poll finds nothing (before it spins, then parks) until the call returns. The ring's
    blocking calls keep the words in C (``csrc/mps_ring.h``); other waits (a task's control
    pipe) go through :meth:`waiting`.

    The sequence number is odd while the words change (a seqlock): a reader in another
    process takes the words when it reads the same even number before and after them, so it
    never sees a wait both ended and going on.

    >>> clock = WaitClock()
    >>> with clock.waiting(WaitClock.INPUT):
    ...     clock.waiting_now
    1
    >>> clock.waiting_now, clock.seconds(WaitClock.INPUT) > 0
    (0, True)
    """

    INPUT, CREDIT = lib.MPS_WAIT_INPUT, lib.MPS_WAIT_CREDIT  # waiting for something to read; for space to write (backpressure)
    WORDS = lib.MPS_CLOCK_WORDS
    __slots__ = ("words", "pointer")

    def __init__(self, words: memoryview | None = None) -> None:
        self.words = memoryview(bytearray(8 * self.WORDS)).cast("q") if words is None else words
        if len(self.words) < self.WORDS:
            raise ValueError(f"a wait clock needs {self.WORDS} int64 words, not {len(self.words)}")
        # the ring's blocking calls keep the time themselves, through this pointer
        self.pointer = ffi.from_buffer("int64_t[]", self.words, require_writable=True)

    def release(self) -> None:
        """Lets go of the words, so that the memory they are in can close; the clock keeps no
        time after this (its pointer is NULL: the ring calls skip it). A wait going on in
        another thread still holds the words: then this raises BufferError."""
        self.pointer = ffi.NULL  # the last reference: the words' export ends with it
        self.words.release()

    def begin(self, reason: int) -> None:
        """A wait for reason begins now."""
        lib.mps_clock_switch(self.pointer, reason)

    def end(self) -> None:
        """The wait going on (if any) ends now: its time goes to its reason's total."""
        lib.mps_clock_switch(self.pointer, 0)

    def waiting(self, reason: int) -> _Waiting:
        """A context manager: a wait for reason."""
        return _Waiting(self, reason)

    @property
    def waiting_now(self) -> int:
        """The reason of the wait going on, 0 when none is."""
        return self.words[1]

    def seconds(self, reason: int) -> float:
        """Seconds waited for reason, the wait going on included (in the process that waits)."""
        words = self.words
        ongoing = time.monotonic_ns() - words[2] if words[1] == reason else 0
        return (words[2 + reason] + ongoing) / 1e9


class _Waiting:
    __slots__ = ("clock", "reason")

    def __init__(self, clock: WaitClock, reason: int) -> None:
        self.clock, self.reason = clock, reason

    def __enter__(self) -> None:
        self.clock.begin(self.reason)

    def __exit__(self, *exc: object) -> None:
        self.clock.end()


def _blocking(call: Any, timeout: float | None) -> int:
    """Calls call(slice_ns) until it stops timing out; the C side parks on a futex (and keeps
    the wait's time on the endpoint's WaitClock). Slices are short so Python runs signal
    handlers (Ctrl-C) between them. ``time.monotonic`` is read only for a timeout, and again
    only when a slice ends with nothing (the common wait takes one call)."""
    if timeout is not None and timeout != timeout:
        raise ValueError("a timeout must be a number of seconds or None, not NaN")
    deadline, left = None if timeout is None else time.monotonic() + timeout, timeout
    while True:
        if left is not None and left <= 0:
            return _TIMEOUT  # (a timeout <= 0: the caller polled once already)
        rc = call(_SLICE_NS if left is None else int(min(_SLICE_NS, left * 1e9)) or 1)
        if rc != _TIMEOUT and rc != _INTERRUPTED:
            return rc  # a record, a rung doorbell, or an error
        if deadline is not None:  # on INTERRUPTED, Python has run the signal handler (KeyboardInterrupt, ...)
            left = deadline - time.monotonic()


class _Endpoint:
    """One attached side of a channel: the mapping, the C handle, and the blocking loop.
    Its waits go on ``clock`` (its own, unless a task shares its own with every endpoint)."""

    _side: int
    _role: str

    def __init__(self, name: str, spin_ns: int = DEFAULT_SPIN_NS, nap_ns: int = DEFAULT_NAP_NS,
                 clock: WaitClock | None = None) -> None:
        self.name = name
        self.clock = WaitClock() if clock is None else clock
        self._mapping = _Mapping.open(name)
        out = ffi.new("struct mps_ring **")
        rc = lib.mps_ring_attach(self._mapping.segment, self._side, spin_ns, nap_ns, out)
        if rc != lib.MPS_ATTACH_OK:
            raise LayoutError(self._attach_message(rc))
        self._ring = ffi.gc(out[0], lib.mps_ring_free)
        self._data_index = lib.MPS_RING_DATA_OFFSET
        self._capacity = self._mapping.length - self._data_index
        self._skew = lib.MPS_RECORD_HEADER_LENGTH

    def _attach_message(self, rc: int) -> str:
        reasons = {
            lib.MPS_ATTACH_BAD_MAGIC: "it is not an mpstream ring",
            lib.MPS_ATTACH_BAD_VERSION: "it was written by another mpstream layout version; "
                                        "run both sides with one mpstream version",
            lib.MPS_ATTACH_BAD_CAPACITY: "its capacity does not match its size (corrupt segment)",
            lib.MPS_ATTACH_SIDE_TAKEN: f"another live process is already its {self._role}; "
                                       f"a channel has exactly one writer and one reader",
            lib.MPS_ATTACH_NO_MEMORY: "out of memory",
        }
        return f"cannot attach to channel {self.name!r} as {self._role}: {reasons.get(rc, rc)}"

    def _raise_for(self, rc: int, timeout: float | None) -> None:
        peer = "reader" if self._side == lib.MPS_RING_PRODUCER else "writer"
        if rc == lib.MPS_RING_PEER_DEAD:
            raise PeerDiedError(f"channel {self.name!r}: the {peer} process died while this "
                                f"{self._role} waited on it; restart the job from its last checkpoint")
        if rc == lib.MPS_RING_CLOSED:
            raise ChannelClosedError(f"channel {self.name!r}: the reader closed its end; "
                                     f"stop writing to it")
        if rc == lib.MPS_RING_BAD_STATE:
            raise ChannelError(f"channel {self.name!r}: " + ("release the previous record before reading the next"
                               if self._side == lib.MPS_RING_CONSUMER else
                               "a record is still claimed (a write was interrupted): use a new writer"))
        if rc == _TIMEOUT:
            raise ChannelTimeoutError(f"channel {self.name!r}: the {self._role} waited {timeout} s "
                                      f"for its {peer}; raise the timeout or check that the {peer} runs")
        raise ChannelError(f"channel {self.name!r}: ring call failed with code {rc}")

    def stats(self) -> dict[str, int]:
        """Positions, records moved and time spent waiting on the peer, for this side."""
        s = ffi.new("struct mps_ring_stats *")
        lib.mps_ring_get_stats(self._ring, s)
        return {"tail_position": s.tail_position, "head_position": s.head_position,
                "records": s.records, "waits": s.waits, "wait_ns": s.wait_ns}

    def _detach(self) -> None:
        if self._ring is not None:
            ffi.release(self._ring)
            self._ring = None


class ChannelWriter(_Endpoint):
    """The producer side of a channel, attached by name in the writing process.

    Each column is copied once, straight into the ring. A write blocks while the ring has no
    space or credit (backpressure); ``timeout`` (seconds, None = forever) bounds the wait.
    Raises :class:`PeerDiedError` if the reader's process dies meanwhile and
    :class:`ChannelClosedError` if it closed its end.
    """

    _side = lib.MPS_RING_PRODUCER
    _role = "writer"

    def __init__(self, name: str, spin_ns: int = DEFAULT_SPIN_NS, nap_ns: int = DEFAULT_NAP_NS,
                 clock: WaitClock | None = None) -> None:
        super().__init__(name, spin_ns, nap_ns, clock)
        self._out = memoryview(self._mapping.buffer)
        self._base = ffi.cast("uint8_t *", self._mapping.base)
        self._offset = ffi.new("uint64_t *")
        self._frame: Frame | None = None
        self._closed = False

    def _claim(self, kind: int, length: int, timeout: float | None, rc: int | None = None) -> int:
        """Claims a record; returns its payload's index in the segment. rc: what the caller's
        own try_claim of it returned, if it made one."""
        if self._closed:
            raise ChannelClosedError(f"channel {self.name!r}: this writer is closed")
        ring, offset = self._ring, self._offset
        if rc is None:
            rc = lib.mps_ring_try_claim(ring, kind, length, offset)
        if rc == _OK:
            return self._data_index + offset[0]
        if rc == _FULL:
            clock = self.clock.pointer
            rc = _blocking(lambda ns: lib.mps_ring_claim(ring, kind, length, ns, offset, clock), timeout)
        if rc == lib.MPS_RING_NO_SPACE:
            raise SharedMemoryFullError(
                f"channel {self.name!r}: {SHM_DIR} (or memory) ran out while the writer reserved the "
                f"ring's next pages: enlarge {SHM_DIR} (docker run --shm-size), give channels a smaller "
                f"capacity, or run fewer jobs at once")
        if rc == lib.MPS_RING_TOO_LARGE:
            raise RecordTooLargeError(
                f"channel {self.name!r}: a {length}-byte record exceeds the limit of "
                f"{lib.mps_ring_max_payload_length(self._capacity)} bytes (about half the capacity); "
                f"split the batch or create the channel with a larger capacity")
        if rc != lib.MPS_RING_OK:
            self._raise_for(rc, timeout)
        return self._data_index + offset[0]

    def _write_bytes(self, kind: int, payload: bytes, timeout: float | None) -> None:
        self._claim(kind, len(payload), timeout)
        lib.mps_ring_commit_with(self._ring, payload, len(payload))

    def write(self, batch: Batch, timeout: float | None = None, rows: np.ndarray | None = None) -> None:
        """Writes one batch (preceded by a SCHEMA record when its columns changed). With rows
        (int64 indices into batch), writes ``batch.take(rows)``: gathered straight into the
        ring when no column is a string one (a partitioned output's parts), else taken first."""
        frame, schema = self._frame, batch.schema
        if frame is None or (frame.schema is not schema and frame.schema != schema):  # is: a batch read in this frame
            frame = Frame(schema, self._skew, self._out)
            self._write_bytes(lib.MPS_RECORD_SCHEMA, frame.encode_schema(), timeout)
            self._frame = frame
        if rows is None:
            layout = frame.layout(batch)
        elif frame.fixed_width:
            rows = np.asarray(rows, np.int64)
            if len(rows) and not (0 <= rows.min() and rows.max() < batch.num_rows):  # the gather clips
                raise IndexError(f"channel {self.name!r}: rows to write must be in 0..{batch.num_rows - 1}")
            layout = frame.layout_rows(len(rows))
        else:
            batch, rows = batch.take(rows), None
            layout = frame.layout(batch)
        length, header, places = layout
        offset = self._offset
        rc = None if self._closed else lib.mps_ring_try_claim(self._ring, _DATA, length, offset)  # the hot path
        index = self._data_index + offset[0] if rc == _OK else self._claim(_DATA, length, timeout, rc)
        try:
            if rows is None:
                frame.write(self._base, index, places, batch)
            else:
                frame.write_rows(index, places, batch, rows)
        except BaseException:
            lib.mps_ring_abort(self._ring)
            raise
        lib.mps_ring_commit_with(self._ring, header, len(header))  # the header goes in with the commit

    def write_barrier(self, checkpoint_id: int, timeout: float | None = None) -> None:
        """Writes BARRIER(checkpoint_id), in band after every batch written before it."""
        self._write_bytes(lib.MPS_RECORD_BARRIER, _U64.pack(checkpoint_id), timeout)

    def write_watermark(self, event_time: int, timeout: float | None = None) -> None:
        """Writes WATERMARK(event_time): no later record has an event time below it."""
        self._write_bytes(lib.MPS_RECORD_WATERMARK, _I64.pack(event_time), timeout)

    def write_status(self, idle: bool, timeout: float | None = None) -> None:
        """Writes STATUS: the channel goes idle (its watermark no longer holds others back) or
        active again."""
        self._write_bytes(lib.MPS_RECORD_STATUS, _U64.pack(1 if idle else 0), timeout)

    def close(self, timeout: float | None = None) -> None:
        """Writes END_OF_STREAM after all data, then detaches. A reader already gone is fine."""
        if self._ring is None:
            return
        try:
            if not self._closed:
                self._write_bytes(lib.MPS_RECORD_END_OF_STREAM, b"", timeout)
        except (ChannelClosedError, PeerDiedError):
            pass
        finally:
            self._closed = True
            self._detach()

    def __enter__(self) -> ChannelWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Record:
    """The record a reader holds: use it as a context manager, which releases it on exit.

    kind is a :class:`RecordKind`; ``batch`` (DATA) holds read-only views valid until release;
    ``value`` is the checkpoint id (BARRIER), the event time (WATERMARK) or 1 for idle, 0 for
    active (STATUS). A reader holds one
    record at a time and reuses this object for the next one.
    """

    __slots__ = ("kind", "batch", "value", "_ring", "held")

    def __init__(self, ring: Any) -> None:
        self._ring = ring
        self.held = False
        self.kind: RecordKind | None = None
        self.batch: Batch | None = None
        self.value: int | None = None

    def release(self, *_exc: object) -> None:
        """Gives the record's space back to the writer. Views on it must not be used after."""
        if self.held:
            self.held = False
            self.batch = None
            lib.mps_ring_release(self._ring)

    def __enter__(self) -> Record:
        return self

    __exit__ = release  # one call less per record read in a with block

    def __repr__(self) -> str:
        what = self.batch if self.kind == RecordKind.DATA else self.value
        return f"Record({self.kind.name if self.kind else None}, {what}, held={self.held})"


class ChannelReader(_Endpoint):
    """The consumer side of a channel, attached by name in the reading process.

    ``read()`` blocks until a record arrives and returns it as a :class:`Record`; hold at most
    one at a time and release it (leave its ``with`` block) before the next read. END_OF_STREAM
    arrives after all data. Raises :class:`PeerDiedError` when the writer's process dies while
    the reader waits, and :class:`ChannelTimeoutError` after ``timeout`` seconds.
    """

    _side = lib.MPS_RING_CONSUMER
    _role = "reader"

    def __init__(self, name: str, spin_ns: int = DEFAULT_SPIN_NS, nap_ns: int = DEFAULT_NAP_NS,
                 clock: WaitClock | None = None) -> None:
        super().__init__(name, spin_ns, nap_ns, clock)
        self._in = memoryview(self._mapping.buffer).toreadonly()
        self._peeked = ffi.new("struct mps_record *")
        self._frame: Frame | None = None
        self._record = Record(self._ring)

    def read(self, timeout: float | None = None) -> Record:
        """The next record (DATA, BARRIER, WATERMARK or END_OF_STREAM); see the class doc."""
        record = self._record
        if record.held:
            raise ChannelError(f"channel {self.name!r}: release the previous record before reading the next")
        ring, rec = self._ring, self._peeked
        while True:
            rc = lib.mps_ring_try_peek(ring, rec)
            if rc == _EMPTY:
                clock = self.clock.pointer
                rc = _blocking(lambda ns: lib.mps_ring_peek(ring, ns, rec, clock), timeout)
            if rc != _OK:
                self._raise_for(rc, timeout)
            if self._accept(rec):
                return record

    def fill(self) -> float:
        """The share of the ring taken by records written and not yet released (0 to 1; 0
        once this reader is closed)."""
        if self._ring is None:
            return 0.0
        s = self.stats()
        return (s["tail_position"] - s["head_position"]) / self._capacity

    @property
    def position(self) -> int:
        """The ring position of the next record to take (a held record starts there)."""
        return lib.mps_ring_head(self._ring)

    def _accept(self, rec: Any) -> bool:
        """Takes the peeked record rec into self's Record; False (and released) for SCHEMA."""
        kind = rec.type
        if kind == _DATA and (frame := self._frame) is not None:  # the hot path first
            record = self._record
            record.held, record.kind, record.value = True, _DATA_KIND, None  # held first: a corrupt one can be released
            record.batch = frame.read(self._data_index + rec.offset)
            return True
        record = self._record
        index = self._data_index + rec.offset
        if kind == _SCHEMA:
            self._frame = self._schema(index, rec.length)
            lib.mps_ring_release(self._ring)
            return False
        record.held = True
        record.kind = kind = _KINDS[kind]
        record.batch = self._batch(index, self._frame) if kind is RecordKind.DATA else None  # it says what is wrong
        record.value = None if kind is RecordKind.DATA else self._value(kind, index)
        return True

    def _schema(self, index: int, length: int) -> Frame:
        """The frame of the SCHEMA record at index (the batches after it are in it)."""
        return Frame.decode_schema(bytes(self._in[index : index + length]), self._skew, self._in)

    def _batch(self, index: int, frame: Frame | None) -> Batch:
        """The DATA record at index as views on the ring, in frame (the schema before it)."""
        if frame is None:
            raise LayoutError(f"channel {self.name!r}: DATA record before any SCHEMA record")
        return frame.read(index)

    def _value(self, kind: RecordKind, index: int) -> int | None:
        """A control record's value: the checkpoint id, the event time, 1 (idle) or 0."""
        if kind is RecordKind.WATERMARK:
            return _I64.unpack_from(self._in, index)[0]
        if kind is RecordKind.END_OF_STREAM:
            return None
        return _U64.unpack_from(self._in, index)[0]  # BARRIER, STATUS

    def close(self) -> None:
        """Detaches (dropping a held record); the writer's next blocked or future write gets
        ChannelClosedError."""
        self._record.held = False
        self._detach()

    def __enter__(self) -> ChannelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LookAhead:
    """Reads the records a channel's writer committed beyond what its reader took, without
    taking them: an unaligned checkpoint copies the records that precede the writer's barrier
    (its in-flight data) while they still wait in the ring.

    It starts at the reader's head. ``next()`` returns ``(kind, batch or value)`` of the next
    record (a DATA batch as an owned copy), or None when it reached what was written so far.
    A reader takes SCHEMA records by itself (an input gate even on a channel it then does not
    return a record from): a look-ahead left behind moves up to the reader's head and frame.
    The reader must not take a DATA or control record the look-ahead has not passed.
    """

    def __init__(self, reader: ChannelReader) -> None:
        self.reader = reader
        self._position = ffi.new("uint64_t *", reader.position)
        self._frame = reader._frame
        self._peeked = ffi.new("struct mps_record *")

    def next(self) -> tuple[RecordKind, Batch | int | None] | None:
        reader, rec = self.reader, self._peeked
        head = reader.position
        if self._position[0] < head:  # the reader took SCHEMA records past it: released space
            self._position[0], self._frame = head, reader._frame
        while True:
            rc = lib.mps_ring_scan(reader._ring, self._position, rec)
            if rc == _EMPTY:
                return None
            if rc != _OK:
                reader._raise_for(rc, None)
            index = reader._data_index + rec.offset
            if rec.type == _SCHEMA:
                self._frame = reader._schema(index, rec.length)
                continue
            kind = _KINDS[rec.type]
            return kind, (reader._batch(index, self._frame).copy() if kind is RecordKind.DATA
                          else reader._value(kind, index))


class InputGate:
    """Reads several channels of one consumer fairly, blocking on all of them at once.

    ``read()`` returns ``(channel index, Record)`` for the next record of any channel, polling
    round-robin so a busy channel cannot starve the others; when every channel is empty it
    sleeps on all their futexes together (futex_waitv). A channel that delivered END_OF_STREAM
    is read no more; ``done`` is true once every channel has. Order within a channel is kept;
    across channels there is none.

    >>> import numpy as np
    >>> with Channel("a", 1 << 12) as a, Channel("b", 1 << 12) as b:
    ...     for chan, x in ((a, 1), (b, 2)):
    ...         with ChannelWriter(chan.name) as w:
    ...             w.write(Batch({"x": np.array([x])}))
    ...     gate = InputGate([ChannelReader(a.name), ChannelReader(b.name)])
    ...     seen = []
    ...     while not gate.done:
    ...         with gate.read()[1] as record:
    ...             if record.kind == RecordKind.DATA:
    ...                 seen.append(int(record.batch["x"][0]))
    ...     gate.close()
    >>> sorted(seen)
    [1, 2]
    """

    def __init__(self, readers: list[ChannelReader], clock: WaitClock | None = None) -> None:
        if not 0 < len(readers) < lib.MPS_RING_MAX_WAIT_SET:  # one futex of the wait set is a doorbell's
            raise ValueError(f"an InputGate takes 1 to {lib.MPS_RING_MAX_WAIT_SET - 1} channels, got {len(readers)}")
        self.readers = list(readers)
        self.clock = WaitClock() if clock is None else clock  # where its waits go
        self.live = list(range(len(readers)))  # channels that have not delivered END_OF_STREAM
        self.blocked: set[int] = set()  # channels not read until unblock_all (barrier alignment)
        self._readable: list[int] = []
        self._rings = ffi.new("struct mps_ring *[]", len(readers))
        self._next = ffi.new("uint32_t *")
        self._peeked = ffi.new("struct mps_record *")
        self._ended: int | None = None
        self._refresh()

    def _refresh(self) -> None:
        self._readable = [c for c in self.live if c not in self.blocked]
        for i, channel in enumerate(self._readable):
            self._rings[i] = self.readers[channel]._ring
        self._next[0] = 0

    @property
    def done(self) -> bool:
        """True once every channel's END_OF_STREAM was read and released."""
        self._retire_ended()
        return not self.live

    def block(self, channel: int) -> None:
        """Reads nothing more from channel until :meth:`unblock_all` (checkpoint alignment)."""
        self.blocked.add(channel)
        self._refresh()

    def unblock_all(self) -> None:
        self.blocked.clear()
        self._refresh()

    def _retire_ended(self) -> None:
        """Drops the channel whose END_OF_STREAM the caller has released by now."""
        if self._ended is None or self.readers[self._ended]._record.held:
            return
        self.live.remove(self._ended)
        self.blocked.discard(self._ended)
        self._ended = None
        self._refresh()

    def read(self, timeout: float | None = None) -> tuple[int, Record]:
        """(index of the channel in readers, its Record); see the class doc. Raises
        ChannelTimeoutError after ``timeout`` seconds without a record; ``read(0)`` only polls."""
        got = self.wait(timeout)
        if got is None:
            self.readers[0]._raise_for(_TIMEOUT, timeout)
        return got

    def wait(self, timeout: float | None = None, doorbell: Doorbell | None = None) -> tuple[int, Record] | None:
        """As :meth:`read`, but None when ``timeout`` passed or ``doorbell`` rang first (it
        rang if its word changed since its last :meth:`Doorbell.answer`)."""
        self._retire_ended()
        if self._ended is not None:
            raise ChannelError("release the previous record before reading the next")
        if not self._readable:
            raise ChannelError("every channel of this gate has ended" if not self.live
                               else "every live channel of this gate is blocked: unblock_all() first")
        rings, count, nxt, rec = self._rings, len(self._readable), self._next, self._peeked
        while True:
            rc = lib.mps_ring_peek_any(rings, count, nxt, 0, rec, ffi.NULL)
            if rc == _EMPTY:
                clock = self.clock.pointer
                if doorbell is None:
                    rc = _blocking(lambda ns: lib.mps_ring_peek_any(rings, count, nxt, ns, rec, clock), timeout)
                else:
                    word, seen = doorbell.word, doorbell.seen
                    rc = _blocking(lambda ns: lib.mps_ring_peek_any_or(rings, count, nxt, ns, rec, word, seen, clock),
                                   timeout)
                if rc == _TIMEOUT or rc == lib.MPS_RING_RUNG:
                    return None
            channel = self._readable[nxt[0]]
            reader = self.readers[channel]
            if rc != _OK:
                reader._raise_for(rc, timeout)
            if reader._accept(rec):
                nxt[0] += 1
                if reader._record.kind is RecordKind.END_OF_STREAM:
                    self._ended = channel
                return channel, reader._record

    def close(self) -> None:
        """Closes every reader of the gate."""
        for reader in self.readers:
            reader.close()


class Doorbells:
    """A shared-memory segment of doorbells: 32-bit futex words, one per slot, each in its own
    cache line. One process rings slot i (bumps the word and wakes whoever sleeps on it) to get
    the attention of the process that sleeps on it: mpstream's coordinator rings a task's bell
    after sending it a message, and the task sleeps on its input channels and its bell at once
    (:meth:`InputGate.wait`), so it needs no polling loop to see messages.

    ``Doorbells(label, slots)`` creates the segment and owns its name (``close()`` unlinks it);
    ``Doorbells.open(name)`` attaches in another process.

    >>> with Doorbells("example-bells", 2) as bells:
    ...     mine = Doorbells.open(bells.name).slot(1)
    ...     before = mine.rung                  # a new slot: nobody rang
    ...     bells.ring(1)
    ...     after = mine.rung
    ...     mine.answer()
    >>> before, after, mine.rung
    (False, True, False)
    """

    _LINE = 64

    def __init__(self, label: str, slots: int, *, _mapping: _Mapping | None = None, _owner: bool = True) -> None:
        if _mapping is None:
            self.name = segment_name(label)
            length = max(slots * self._LINE, lib.MPS_RING_DATA_OFFSET)  # what mps_segment_open accepts
            check_free_space(f"doorbells {label!r}", length)
            out = ffi.new("struct mps_segment **")
            err = lib.mps_segment_create(self.name.encode(), length, length, out)
            if err:
                raise _full_error(f"doorbells {label!r}", length, None) if err == errno.ENOSPC else \
                    ChannelError(f"cannot create doorbells {label!r} ({self.name}): {os.strerror(err)}")
            _mapping = _Mapping(out[0])  # takes over the creator's reference
        else:
            self.name = label
        self._mapping = _mapping
        self._words = ffi.cast("uint32_t *", _mapping.base)
        self._owner_pid = os.getpid() if _owner else 0

    @classmethod
    def open(cls, name: str) -> Doorbells:
        return cls(name, 0, _mapping=_Mapping.open(name), _owner=False)

    def word(self, slot: int) -> Any:
        """The C pointer to slot's word (valid while this object lives)."""
        return self._words + slot * (self._LINE // 4)

    def ring(self, slot: int) -> None:
        lib.mps_doorbell_ring(self.word(slot))

    def slot(self, slot: int) -> Doorbell:
        return Doorbell(self, slot)

    def close(self) -> None:
        """Unlinks the name (the creator only); mappings stay valid while their objects live."""
        if self._owner_pid == os.getpid():
            lib.mps_segment_unlink(self.name.encode())
            self._owner_pid = 0

    def __enter__(self) -> Doorbells:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedCounters:
    """Named counters in memory that the processes forked after it was made share (an
    anonymous shared mapping: no name in /dev/shm, nothing to clean up): :meth:`next` hands out
    0, 1, 2, ... across all of them, each number once. The coordinator makes one per attempt of
    a job, a counter per operator (:attr:`~mpstream.operators.Context.claim`).

    >>> import os
    >>> shared = SharedCounters(["src"])
    >>> pid = os.fork()
    >>> if pid == 0:
    ...     shared.next("src"); os._exit(0)
    >>> _ = os.waitpid(pid, 0)
    >>> shared.next("src"), shared.next("src")
    (1, 2)
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._index = {name: i for i, name in enumerate(names)}
        self._memory = mmap.mmap(-1, 8 * max(1, len(self._index)))  # MAP_SHARED | MAP_ANONYMOUS
        self._buffer = ffi.from_buffer(self._memory)  # keeps the words' address valid
        self._words = ffi.cast("uint64_t *", self._buffer)

    def next(self, name: str) -> int:
        return lib.mps_counter_next(self._words + self._index[name])


class Doorbell:
    """The slot of :class:`Doorbells` a process sleeps on: it has :attr:`rung` when its word
    changed since the last :meth:`answer`. Answer first, then look for the reason (a message):
    a ring that comes after is seen next time. A new segment's words are 0 and a Doorbell starts
    from 0, so a ring that came before it was made (before the process got this far) counts."""

    __slots__ = ("board", "word", "seen")

    def __init__(self, board: Doorbells, slot: int) -> None:
        self.board = board  # keeps the mapping alive
        self.word = board.word(slot)
        self.seen = 0

    @property
    def rung(self) -> bool:
        return self.word[0] != self.seen

    def answer(self) -> None:
        self.seen = self.word[0]
