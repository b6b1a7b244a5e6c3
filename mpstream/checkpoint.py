"""Checkpoint storage: one directory per checkpoint, committed atomically, checksummed, versioned.

Layout of a checkpoint directory (``{root}/chk-{id:010d}/``)::

    {operator}-{instance}.state   one per operator instance (see state_key), written by the
                                  worker running it: MAGIC (8 bytes) | version u32 | crc32 u32 |
                                  length u64 | body (its crc32 and length): the pickled
                                  OperatorSnapshot (protocol 5: u64 length | pickle) and the
                                  buffers it holds out of band (per buffer: u64 padding | u64
                                  length | padding zeros | bytes; the padding puts every
                                  buffer at a multiple of 64 bytes from the file's start)
    _metadata                     JSON, written last by the coordinator, atomically (temp file,
                                  fsync, rename, fsync of the directory): {"format": VERSION,
                                  "id": n, "created": unix time, "states": {"op-i": {"file",
                                  "bytes", "crc32"}}, "stats": {...}}

A checkpoint exists only once its ``_metadata`` does: a crash before that leaves a directory
that is never restored. Restoring checks every checksum and falls back to the previous
complete checkpoint when a file is corrupt or truncated. Only the last ``retain`` are kept.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import pickle
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._mps import ffi, lib
from .channel import RecordKind
from .errors import CheckpointError, CheckpointFormatError

__all__ = ["CheckpointStore", "CheckpointError", "StateFile", "OperatorSnapshot", "FORMAT_VERSION", "state_key",
           "restore_from"]

#: 2: a state file holds an OperatorSnapshot (1 held a dict with the source offset).
#: 3: string keys hash another way (wyhash's construction): their key groups moved, so keyed
#: state of format 2 would sit on the wrong instances. And numpy arrays are written out of band,
#: straight from their memory: pickling copied all of a state while holding the GIL, which
#: stalled the task for tens of milliseconds per checkpoint at 90 MB.
#: 4: a file source's position holds the units done and in hand (its instances share units),
#: and aggregate(salt=n) has no ".partial" stage: format 3's would be read wrong or dropped.
#: 5: an operator's snapshot may hold the in-flight records of an unaligned checkpoint.
#: 6: in-memory columns sources (from_arrays, from_numpy) share units as the file sources do:
#: their positions hold units, not format 5's offset per instance.
#: 7: a batch in a snapshot (a window's rows, in-flight records) pickles as its schema and
#: plain buffers (``Batch.__reduce__``), which format 6's readers cannot unpickle; format 6's
#: files unpickle as they are, so both are read.
FORMAT_VERSION = 7
_READS = (6, FORMAT_VERSION)
_MAGIC = b"MPSSTATE"
_HEADER = struct.Struct("<8sIIQ")
_LENGTH = struct.Struct("<Q")
_ALIGN = 64  # restored arrays start on a cache line: numpy's fast paths, aligned C loads
_CHUNK = 1 << 20  # bytes copied, checksummed and written at a time
_BLOCK = 4096  # direct I/O writes whole blocks from block-aligned memory
_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none
_SMALL = 4096  # parts below this are copied holding the GIL (see _StateFileWriter)
_METADATA = "_metadata"


def state_key(operator: str, instance: int) -> str:
    """The key of an operator instance's state in a checkpoint (and its file's name)."""
    return f"{operator}-{instance}"


@dataclass
class OperatorSnapshot:
    """What a checkpoint keeps of one operator instance: the operator's own ``snapshot()``
    (a source's position included), its pending timers, whether it had already processed the
    end of its input (then ``close()`` is not run again after a restore: its final output was
    already emitted), and its event time. The head of a task also keeps its input channels'
    watermarks (``valve``: per producing operator instance) or, for a source, its watermark
    generator's state, so a restore continues with exactly the watermarks it had. After an
    unaligned checkpoint the head also keeps its ``in_flight`` records: per producing operator
    instance, ``(RecordKind, batch or value)`` in channel order, processed first on restore."""

    operator: Any
    timers: list[Any] = field(default_factory=list)
    finished: bool = False
    watermark: int = -(2**63)
    valve: dict[str, Any] | None = None
    generator: dict[str, Any] | None = None
    in_flight: dict[str, list[tuple[int, Any]]] | None = None


@dataclass(frozen=True)
class StateFile:
    """Where one operator instance's state of a checkpoint lies, and how to check it."""

    file: str
    bytes: int
    crc32: int
    in_flight_rows: int = 0  # rows of the in-flight records it holds (unaligned checkpoints)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_crc32(data: bytes | memoryview, crc: int = 0, into: Any = ffi.NULL) -> int:
    """``zlib.crc32(data, crc)``, copying data to ``into`` (a cffi ``uint8_t *``) on the way
    unless it is NULL: one pass in C without the GIL (``mps_crc32``; about four times zlib's
    speed where the CPU folds)."""
    return lib.mps_copy_crc32(into, ffi.from_buffer("uint8_t[]", data), len(data), crc)


class _StateFileWriter:
    """Writes a state file: its body is copied a megabyte at a time into a page-aligned buffer,
    checksummed as it is copied, and written from there, so the file matches its checksum even
    if an operator's snapshot shares memory it goes on changing (the task's C kernels change
    it without the GIL). The header goes in last, with the checksum, from the first chunk,
    kept until then. Parts of a page or more are copied in C without the GIL; smaller ones
    (pickles, padding, small arrays) keep it: giving the GIL up and taking it back can wait
    for a busy task's switch interval (5 ms) each time.

    The chunks bypass the page cache (``O_DIRECT``) where the file system allows it: a
    buffered write of a large state costs more CPU time getting fresh page-cache pages than
    the copy and the checksum together, on the cores that run the pipeline, and the data
    goes to the disk at the fsync anyway. Where direct I/O is refused (some network or FUSE
    file systems, devices with blocks above 4 KiB) the file is written through the page
    cache."""

    def __init__(self, path: str) -> None:
        self.first = mmap.mmap(-1, _CHUNK)  # page-aligned, as direct I/O wants; written last
        self.chunk = mmap.mmap(-1, _CHUNK)
        self._to_first = ffi.from_buffer("uint8_t[]", self.first)  # released before the unmap
        self._to_chunk = ffi.from_buffer("uint8_t[]", self.chunk)
        self.crc, self.at = 0, _HEADER.size  # the checksum of the body so far; bytes so far
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _DIRECT, 0o644)
        except OSError as exc:
            if not _DIRECT or exc.errno != errno.EINVAL:
                self._unmap(failing=True)
                raise
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def __enter__(self) -> _StateFileWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        try:
            os.close(self.fd)
        finally:
            self._unmap(failing=kind is not None)

    def _unmap(self, failing: bool) -> None:
        ffi.release(self._to_first)
        ffi.release(self._to_chunk)
        for buffer in (self.first, self.chunk):
            try:
                buffer.close()
            except BufferError:  # a view of it in the traceback of the error on its way out:
                if not failing:  # unmapped once that is collected; never hide the error
                    raise

    def put(self, part: bytes | memoryview) -> None:
        """Appends part to the body."""
        part = memoryview(part).cast("B")
        while len(part):
            buffer, to = (self.first, self._to_first) if self.at < _CHUNK else (self.chunk, self._to_chunk)
            offset = self.at % _CHUNK
            n = min(_CHUNK - offset, len(part))
            if n < _SMALL:  # copied, then checksummed from the copy: what the file gets
                buffer[offset : offset + n] = part[:n]
                self.crc = zlib.crc32(buffer[offset : offset + n], self.crc)
            else:
                self.crc = _copy_crc32(part[:n], self.crc, to + offset)
            self.at += n
            part = part[n:]
            if self.at % _CHUNK == 0 and buffer is self.chunk:
                self._write(self.chunk, _CHUNK, self.at - _CHUNK)

    def finish(self) -> None:
        """Writes the header and what is left, trims the padding direct I/O needs, fsyncs."""
        if self.at > _CHUNK and self.at % _CHUNK:
            self._write(self.chunk, self.at % _CHUNK, self.at - self.at % _CHUNK)
        self.first[: _HEADER.size] = _HEADER.pack(_MAGIC, FORMAT_VERSION, self.crc, self.at - _HEADER.size)
        self._write(self.first, min(self.at, _CHUNK), 0)
        os.ftruncate(self.fd, self.at)
        os.fsync(self.fd)

    def _write(self, buffer: mmap.mmap, n: int, offset: int) -> None:
        """Writes buffer[:n] at offset, padded with zeros to whole blocks (what direct I/O
        writes; ``finish`` trims the file); through the page cache if direct I/O fails."""
        padded = -(-n // _BLOCK) * _BLOCK
        buffer[n:padded] = bytes(padded - n)
        done = 0
        while done < padded:  # a short write: the disk is full, and the next write says so
            try:
                written = os.pwrite(self.fd, memoryview(buffer)[done:padded], offset + done)
            except OSError as exc:  # some file systems take O_DIRECT at open and refuse the writes
                flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                if exc.errno != errno.EINVAL or not flags & _DIRECT:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~_DIRECT)  # the retry goes buffered
                continue
            if written == 0:
                raise OSError(errno.ENOSPC, "no byte written", self.fd)
            done += written


class CheckpointStore:
    """Checkpoints under ``root``; keeps the last ``retain`` complete ones."""

    def __init__(self, root: str, retain: int = 3) -> None:
        if retain < 1:
            raise ValueError(f"retain must be >= 1, got {retain}")
        self.root, self.retain = root, retain

    def create(self) -> None:
        """Makes the root directory (a store only reads until something is written)."""
        os.makedirs(self.root, exist_ok=True)

    def directory(self, checkpoint_id: int) -> str:
        return os.path.join(self.root, f"chk-{checkpoint_id:010d}")

    # ---- written by workers -----------------------------------------------------------------

    def write_state(self, checkpoint_id: int, operator: str, instance: int, state: OperatorSnapshot) -> StateFile:
        """Pickles state into its file (fsynced); returns what the coordinator records. Its
        numpy arrays go out of band (see the module doc), written by :class:`_StateFileWriter`."""
        buffers: list[pickle.PickleBuffer] = []
        pickled = pickle.dumps(state, protocol=5, buffer_callback=buffers.append)
        directory = self.directory(checkpoint_id)
        os.makedirs(directory, exist_ok=True)
        name = f"{state_key(operator, instance)}.state"
        path = os.path.join(directory, name)
        try:
            with _StateFileWriter(path) as f:
                f.put(_LENGTH.pack(len(pickled)) + pickled)
                for buffer in buffers:
                    raw = buffer.raw()
                    padding = -(f.at + 2 * _LENGTH.size) % _ALIGN
                    f.put(_LENGTH.pack(padding) + _LENGTH.pack(raw.nbytes) + bytes(padding))
                    f.put(raw)
                f.finish()
        except OSError as exc:
            raise CheckpointError(f"checkpoint {checkpoint_id}: cannot write the state of operator "
                                  f"{operator!r} instance {instance} to {directory}: {exc}") from exc
        return StateFile(name, f.at, f.crc, _rows_in(getattr(state, "in_flight", None) or {}))  # any state pickles

    # ---- written by the coordinator ---------------------------------------------------------

    def commit(self, checkpoint_id: int, states: dict[str, StateFile], stats: dict[str, Any]) -> str:
        """Makes checkpoint_id complete (atomically), then drops checkpoints beyond retain
        and the incomplete ones before it."""
        directory = self.directory(checkpoint_id)
        metadata = {"format": FORMAT_VERSION, "id": checkpoint_id, "created": time.time(),
                    "states": {k: {"file": v.file, "bytes": v.bytes, "crc32": v.crc32,
                                   "in_flight_rows": v.in_flight_rows} for k, v in states.items()},
                    "stats": stats}
        temp = os.path.join(directory, _METADATA + ".tmp")
        try:
            with open(temp, "w") as f:
                json.dump(metadata, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(temp, os.path.join(directory, _METADATA))
            _fsync_dir(directory)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {checkpoint_id}: cannot commit to {directory}: {exc}") from exc
        for old in self.complete()[:-self.retain]:
            shutil.rmtree(self.directory(old), ignore_errors=True)
        # failed or timed out before it: each task wrote its files of those before it
        # acknowledged this one (one writer thread per task, in order)
        self.discard_incomplete(before=checkpoint_id)
        return directory

    def discard(self, checkpoint_id: int) -> None:
        """Removes an incomplete checkpoint's files (a failed or abandoned checkpoint)."""
        shutil.rmtree(self.directory(checkpoint_id), ignore_errors=True)

    def discard_incomplete(self, before: int | None = None) -> None:
        """Removes every checkpoint directory without committed metadata (call when no worker
        can still write into one: at the start or the end of a job), or only those of ids
        below ``before``."""
        complete = set(self.complete())
        for checkpoint_id in self._ids():
            if checkpoint_id not in complete and (before is None or checkpoint_id < before):
                self.discard(checkpoint_id)

    # ---- read on restore --------------------------------------------------------------------

    def complete(self) -> list[int]:
        """Ids of the checkpoints whose metadata was committed, oldest first."""
        return [i for i in self._ids() if os.path.exists(os.path.join(self.directory(i), _METADATA))]

    def _ids(self) -> list[int]:
        """Ids of every checkpoint directory, complete or not, oldest first."""
        entries = os.listdir(self.root) if os.path.isdir(self.root) else []
        return sorted(int(entry[4:]) for entry in entries if entry.startswith("chk-"))

    def metadata(self, checkpoint_id: int) -> dict[str, Any]:
        with open(os.path.join(self.directory(checkpoint_id), _METADATA)) as f:
            metadata = json.load(f)
        if metadata.get("format") not in _READS:
            raise CheckpointFormatError(f"checkpoint {checkpoint_id} has format {metadata.get('format')}, this "
                                        f"mpstream reads formats {_READS}: restore it with the version that wrote it")
        return metadata

    def _payload(self, checkpoint_id: int, entry: dict[str, Any]) -> memoryview:
        """A state file's body, after checking its header, length and checksum (writable:
        arrays restored from it are views on it)."""
        path = os.path.join(self.directory(checkpoint_id), entry["file"])
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            memory = np.empty(size + _ALIGN, np.uint8)  # the file at a 64-byte aligned address
            start = -memory.ctypes.data % _ALIGN
            blob = memoryview(memory[start : start + size])
            f.readinto(blob)
        if len(blob) < _HEADER.size:
            raise CheckpointError(f"checkpoint {checkpoint_id}: {path} is truncated")
        magic, version, crc, length = _HEADER.unpack_from(blob)
        payload = blob[_HEADER.size:]
        if magic != _MAGIC:
            raise CheckpointError(f"checkpoint {checkpoint_id}: {path} is not an mpstream state file")
        if version not in _READS:
            raise CheckpointFormatError(f"checkpoint {checkpoint_id}: {path} has format {version}, this mpstream "
                                        f"reads formats {_READS}: restore it with the version that wrote it")
        if len(payload) != length or _copy_crc32(payload) != crc or crc != entry["crc32"]:
            raise CheckpointError(f"checkpoint {checkpoint_id}: {path} is corrupt or truncated (checksum mismatch)")
        return payload

    def read_state(self, checkpoint_id: int, operator: str, instance: int) -> OperatorSnapshot:
        """The state of an operator instance, checked against its checksum. Its numpy arrays
        are writable views on one buffer that holds the whole file (64-byte aligned): an
        array kept keeps the file's memory, and ``ndarray.resize`` needs a ``copy()`` first."""
        entry = self.metadata(checkpoint_id)["states"][state_key(operator, instance)]
        body = self._payload(checkpoint_id, entry)  # starts _HEADER.size bytes past an aligned address
        try:
            (length,), at = _LENGTH.unpack_from(body), _LENGTH.size
            pickled, at = body[at : at + length], at + length
            buffers = []
            while at < len(body):
                (padding,), (length,) = _LENGTH.unpack_from(body, at), _LENGTH.unpack_from(body, at + _LENGTH.size)
                at += 2 * _LENGTH.size + padding
                buffers.append(body[at : at + length])
                at += length
            return pickle.loads(pickled, buffers=buffers)
        except Exception as exc:  # noqa: BLE001 - checksummed: another code version's classes, or a bug
            raise CheckpointError(f"checkpoint {checkpoint_id}: the state of operator {operator!r} instance "
                                  f"{instance} cannot be read: {exc}") from exc

    def operators(self, checkpoint_id: int) -> set[str]:
        """The operators the checkpoint holds states of."""
        return {key.rsplit("-", 1)[0] for key in self.metadata(checkpoint_id)["states"]}

    def in_flight_rows(self, checkpoint_id: int, operator: str | None = None) -> int:
        """Rows of in-flight records the checkpoint holds (an unaligned one), of one operator's
        instances or of all; from the metadata, without reading the state files."""
        return sum(entry.get("in_flight_rows", 0) for key, entry in self.metadata(checkpoint_id)["states"].items()
                   if operator is None or key.rsplit("-", 1)[0] == operator)

    def holds_state(self, checkpoint_id: int, operator: str) -> bool:
        """Whether any instance of operator left state or timers in the checkpoint."""
        return any(s.operator is not None or s.timers for s in
                   (self.read_state(checkpoint_id, operator, i) for i in range(self.instances(checkpoint_id, operator))))

    def instances(self, checkpoint_id: int, operator: str) -> int:
        """How many instances of operator the checkpoint holds states of (its parallelism then)."""
        states = self.metadata(checkpoint_id)["states"]
        count = 0
        while state_key(operator, count) in states:
            count += 1
        return count

    def verify(self, checkpoint_id: int) -> None:
        """Checks every state file of a checkpoint (without unpickling); raises CheckpointError
        on the first bad one."""
        for entry in self.metadata(checkpoint_id)["states"].values():
            self._payload(checkpoint_id, entry)

    def latest_valid(self, first: int = 0) -> tuple[int | None, list[str]]:
        """The newest complete checkpoint (from id ``first`` on) whose files all check out, and
        the problems met on the way (newer checkpoints found corrupt); None if there is none."""
        problems = []
        for checkpoint_id in reversed([n for n in self.complete() if n >= first]):
            try:
                self.verify(checkpoint_id)
                return checkpoint_id, problems
            except CheckpointFormatError:  # not damaged: starting over without it would lose it
                raise
            except (CheckpointError, OSError, KeyError, ValueError) as exc:
                problems.append(str(exc))
        return None, problems


#: Input partitionings whose keyed state can move between instances by key group.
MOVABLE = (None, "hash", "salted", "round_robin")


def _rows_in(records: dict[str, list[tuple[int, Any]]]) -> int:
    """Rows of the batches among in-flight records (per channel: ``(RecordKind, batch or value)``)."""
    return sum(value.num_rows for kept in records.values() for kind, value in kept if kind == RecordKind.DATA)


def restore_from(store: CheckpointStore, checkpoint_id: int, operator: str, parallelism: int, rescalable: bool,
                 partitioning: str | None) -> list[int] | None:
    """The old instances whose states instance i of an operator restores from: None means its
    own (instance i, at an unchanged parallelism: right for every operator), a list means all
    of them (a rescalable operator at another parallelism keeps its key groups). Raises
    CheckpointError, saying what to do, when the operator cannot be restored at this
    parallelism: the checkpoint lacks it; it is not rescalable and has state; or its input is
    partitioned by range or a custom function (its keys cannot be placed by key group)."""
    old = store.instances(checkpoint_id, operator)
    if old == 0:
        raise CheckpointError(f"checkpoint {checkpoint_id} holds no state of operator {operator!r}: the job is not "
                              f"the one that wrote it (an operator was added or renamed); resume it with the job "
                              f"that wrote it, or start without resume")
    if old == parallelism:
        return None
    in_flight = store.in_flight_rows(checkpoint_id, operator)
    if in_flight and partitioning == "custom":  # its function need not route a row the same way twice
        raise CheckpointError(f"operator {operator!r} had parallelism {old} in checkpoint {checkpoint_id} and has "
                              f"{parallelism} now, and the checkpoint holds {in_flight} in-flight rows for it that "
                              f"its custom partitioner would have to route again; run it with parallelism {old}, or "
                              f"resume from an aligned checkpoint (JobHandle.stop() takes one)")
    if rescalable and partitioning in MOVABLE:
        return list(range(old))
    if rescalable:
        raise CheckpointError(f"operator {operator!r} had parallelism {old} in checkpoint {checkpoint_id} and has "
                              f"{parallelism} now, and its input is partitioned by {partitioning}: its state cannot "
                              f"move between instances; run it with parallelism {old} (or key it by hash)")
    if not store.holds_state(checkpoint_id, operator):
        return list(range(old))  # stateless: any parallelism will do
    raise CheckpointError(f"operator {operator!r} had parallelism {old} in checkpoint {checkpoint_id} and has "
                          f"{parallelism} now: only keyed operators (and stateless ones) can change it on restore; "
                          f"run it with parallelism {old}")

