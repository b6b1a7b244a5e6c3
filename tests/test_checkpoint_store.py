"""Checkpoint storage: atomic commit, retention, checksums, format versions."""

import errno
import fcntl
import json
import os
import platform
import struct
import zlib

import numpy as np
import pytest
from conftest import run_on_small_tmpfs

from mpstream import checkpoint
from mpstream._mps import ffi, lib
from mpstream.checkpoint import FORMAT_VERSION, CheckpointError, CheckpointStore
from mpstream.errors import CheckpointFormatError


def write(store, n, value):
    files = {f"op-{i}": store.write_state(n, "op", i, {"value": value, "i": i, "arr": np.arange(3) * value})
             for i in range(2)}
    return store.commit(n, files, {"duration_s": 0.1})


def test_a_checkpoint_exists_only_after_its_metadata_is_committed(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.write_state(1, "op", 0, {"x": 1})  # written, never committed: a crash mid-checkpoint
    assert store.complete() == [] and store.latest_valid() == (None, [])
    write(store, 2, 5)
    assert store.complete() == [2]
    assert store.read_state(2, "op", 1)["i"] == 1
    np.testing.assert_array_equal(store.read_state(2, "op", 0)["arr"], [0, 5, 10])
    assert not os.path.exists(os.path.join(store.directory(2), "_metadata.tmp"))


def test_only_the_last_k_are_retained(tmp_path):
    store = CheckpointStore(str(tmp_path), retain=2)
    for n in range(1, 6):
        write(store, n, n)
    assert store.complete() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["chk-0000000004", "chk-0000000005"]


@pytest.mark.parametrize("damage, says", [("flip", "is corrupt or truncated"), ("truncate", "is corrupt or truncated"),
                                          ("empty", "is truncated"), ("magic", "is not an mpstream state file")])
def test_a_corrupt_state_file_is_detected_and_the_previous_checkpoint_used(tmp_path, damage, says):
    """Reading a state and verifying a checkpoint (a megabyte at a time) say the same."""
    store = CheckpointStore(str(tmp_path))
    write(store, 1, 1)
    write(store, 2, 2)
    path = os.path.join(store.directory(2), "op-1.state")
    blob = bytearray(open(path, "rb").read())
    if damage == "flip":
        blob[-3] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "empty":
        blob = bytearray()
    else:
        blob[:8] = b"NOTMPSST"
    open(path, "wb").write(blob)
    with pytest.raises(CheckpointError, match=f"checkpoint 2: .*op-1.state {says}"):
        store.read_state(2, "op", 1)
    latest, problems = store.latest_valid()
    assert latest == 1 and len(problems) == 1 and f"op-1.state {says}" in problems[0]


def test_a_state_file_of_another_format_version_is_refused_not_skipped(tmp_path):
    store = CheckpointStore(str(tmp_path))
    write(store, 1, 1)
    path = os.path.join(store.directory(1), "op-0.state")
    with open(path, "r+b") as f:
        f.seek(8)  # after the magic: the format version, u32
        f.write(struct.pack("<I", FORMAT_VERSION + 1))
    for check in (lambda: store.read_state(1, "op", 0), store.latest_valid):
        with pytest.raises(CheckpointFormatError, match="op-0.state has format .*restore it with the version"):
            check()


def test_another_format_version_is_refused_with_advice(tmp_path):
    store = CheckpointStore(str(tmp_path))
    write(store, 1, 1)
    meta_path = os.path.join(store.directory(1), "_metadata")
    meta = json.load(open(meta_path))
    meta["format"] = FORMAT_VERSION + 1
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="restore it with the version that wrote it"):
        store.metadata(1)
    with pytest.raises(CheckpointFormatError):  # not skipped as damaged: a resume would start over
        store.latest_valid()


def test_a_resume_over_a_checkpoint_of_another_format_stops_and_keeps_it(tmp_path):
    from mpstream import Pipeline

    store = CheckpointStore(str(tmp_path))
    write(store, 1, 1)
    meta_path = os.path.join(store.directory(1), "_metadata")
    meta = json.load(open(meta_path))
    meta["format"] = 5  # older than any this mpstream reads
    json.dump(meta, open(meta_path, "w"))
    p = Pipeline()
    p.from_arrays("op", {"x": np.arange(10)}).collect("out")
    for resume in (True, "if-present"):
        with pytest.raises(CheckpointFormatError, match="has format 5"):
            p.run(checkpoint_dir=str(tmp_path), resume=resume)
    assert store.complete() == [1] and os.path.exists(meta_path)


def test_a_format_6_checkpoint_holding_batches_pickled_as_their_slots_is_read(tmp_path, monkeypatch):
    """Format 7 changed only how a batch pickles (its schema and plain buffers); a format 6
    file, whose batches pickled as their slots, unpickles as it is."""
    from mpstream import Batch

    batch = Batch({"t": np.arange(4).astype("M8[ms]"), "n": np.ma.MaskedArray(np.arange(4.0), mask=[0, 1, 0, 0])})
    store = CheckpointStore(str(tmp_path))
    with monkeypatch.context() as m:
        m.delattr(Batch, "__reduce__")  # how format 6 pickled a batch
        files = {"op-0": store.write_state(1, "op", 0, {"rows": batch})}
    store.commit(1, files, {"duration_s": 0.1})
    with open(os.path.join(store.directory(1), "op-0.state"), "r+b") as f:
        f.seek(8)  # after the magic: the format version, u32
        f.write(struct.pack("<I", 6))
    meta_path = os.path.join(store.directory(1), "_metadata")
    meta = json.load(open(meta_path))
    meta["format"] = 6
    json.dump(meta, open(meta_path, "w"))
    got = store.read_state(1, "op", 0)["rows"]
    assert got.schema == batch.schema and np.array_equal(got["t"], batch["t"])
    assert np.array_equal(np.ma.getmaskarray(got["n"]), [0, 1, 0, 0]) and np.ma.filled(got["n"], -1).tolist() == [0, -1, 2, 3]


FULL_DISK_SCRIPT = """
import sys
from mpstream.checkpoint import CheckpointError, CheckpointStore
store = CheckpointStore(sys.argv[1])
try:
    store.write_state(1, "agg", 0, b"x" * (1 << 20))
    print("WRITTEN")
except CheckpointError as exc:
    print("FAILED", exc)
print("COMPLETE", store.complete())
"""


def test_a_full_disk_fails_that_checkpoint_with_a_clear_error(tmp_path):
    """The checkpoint directory on a 64 KiB tmpfs in a private mount namespace (needs root)."""
    root = tmp_path / "small"
    root.mkdir()
    out = run_on_small_tmpfs(FULL_DISK_SCRIPT, str(root), "64k")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("FAILED checkpoint 1: cannot write the state of operator 'agg' instance 0")
    assert "No space left on device" in lines[0]
    assert lines[1] == "COMPLETE []"


def test_arrays_are_written_out_of_band_and_come_back_equal_and_writable(tmp_path):
    store = CheckpointStore(str(tmp_path))
    rng = np.random.default_rng(3)
    state = {"sums": rng.standard_normal(100_000), "keys": np.arange(50_000, dtype=np.int32)[::-1].copy(),
             "strided": np.arange(20)[::2], "masked": np.ma.MaskedArray([1, 2, 3], mask=[0, 1, 0]), "n": 7}
    entry = store.write_state(1, "agg", 0, state)
    store.commit(1, {"agg-0": entry}, {"duration_s": 0.1})
    with open(os.path.join(store.directory(1), entry.file), "rb") as f:
        blob = f.read()
    assert state["sums"].tobytes() in blob  # raw, as in memory: not re-encoded by pickle
    back = store.read_state(1, "agg", 0)
    for name in ("sums", "keys", "strided"):
        np.testing.assert_array_equal(back[name], state[name])
        assert back[name].dtype == state[name].dtype and back[name].flags.writeable
    back["sums"][0] = 1.0  # a restored operator may update its state in place
    assert back["masked"].mask.tolist() == [False, True, False] and back["n"] == 7


def test_restored_arrays_start_on_a_cache_line():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mpstream-test-") as directory:
        store = CheckpointStore(directory)
        state = {"a": np.arange(3, dtype=np.int8), "b": np.arange(5, dtype=np.int64), "c": np.ones(7)}
        store.commit(1, {"op-0": store.write_state(1, "op", 0, state)}, {"duration_s": 0.1})
        back = store.read_state(1, "op", 0)
        for name, array in back.items():
            assert array.ctypes.data % 64 == 0, name
            np.testing.assert_array_equal(array, state[name])


def test_a_state_that_changes_while_it_is_written_still_matches_its_checksum(tmp_path, monkeypatch):
    """An operator's snapshot may share an array it goes on updating (KeyedState shares
    values): the file holds the bytes that were checksummed, whatever they are."""

    store = CheckpointStore(str(tmp_path))
    shared = np.zeros(1 << 19)  # 4 MiB: four chunks
    copy_crc32 = checkpoint._copy_crc32

    def copy_then_change(data, crc=0, into=None):
        out = copy_crc32(data, crc, into)
        shared[:] += 1  # the task changes it between the checksum and the write
        return out

    monkeypatch.setattr(checkpoint, "_copy_crc32", copy_then_change)
    entry = store.write_state(1, "op", 0, {"shared": shared})
    monkeypatch.undo()
    store.commit(1, {"op-0": entry}, {"duration_s": 0.1})
    assert store.read_state(1, "op", 0)["shared"].shape == shared.shape  # checks out


def _file_of(store, n, state):
    entry = store.write_state(n, "op", 0, state)
    with open(os.path.join(store.directory(n), entry.file), "rb") as f:
        return entry, f.read()


MIB = 1 << 20


@pytest.mark.parametrize("size", [None, MIB - 1, MIB, MIB + 1, MIB + 4096, 2 * MIB, 2 * MIB + 4095, 3 * MIB + 17])
def test_state_files_around_chunk_and_block_boundaries_hold_exactly_their_bytes(tmp_path, size):
    """A state file is written a chunk (1 MiB) at a time in whole blocks (4 KiB), its first
    chunk (with the header) last, then trimmed: files of exactly these sizes (None: an empty
    array) keep their size, checksum and contents."""
    store = CheckpointStore(str(tmp_path))
    overhead = len(_file_of(store, 1, {"data": np.zeros(1 << 16, np.uint8)})[1]) - (1 << 16)  # header, pickle
    nbytes = 0 if size is None else size - overhead
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    entry, blob = _file_of(store, 2, {"data": data})
    assert len(blob) == entry.bytes == (overhead if size is None else size)
    assert blob[:8] == b"MPSSTATE" and zlib.crc32(blob[24:]) == entry.crc32  # 24: the header
    store.commit(2, {"op-0": entry}, {"duration_s": 0.1})
    np.testing.assert_array_equal(store.read_state(2, "op", 0)["data"], data)


def _direct_io_allowed(directory) -> bool:
    try:
        os.close(os.open(os.path.join(directory, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False


def test_state_files_bypass_the_page_cache_in_aligned_blocks_where_the_file_system_allows(tmp_path, monkeypatch):
    if not _direct_io_allowed(tmp_path):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    direct, pwrite = [], os.pwrite

    def checked(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # what Linux wants of direct I/O
            address = np.frombuffer(data, np.uint8).ctypes.data
            assert offset % 4096 == 0 and len(data) % 4096 == 0 and address % 4096 == 0, (offset, len(data))
            direct.append(len(data))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", checked)
    store = CheckpointStore(str(tmp_path))
    entry = store.write_state(1, "op", 0, {"data": np.arange(300_000)})  # 2.4 MB: three chunks
    monkeypatch.undo()
    assert len(direct) == 3
    store.commit(1, {"op-0": entry}, {"duration_s": 0.1})
    np.testing.assert_array_equal(store.read_state(1, "op", 0)["data"], np.arange(300_000))


def test_short_writes_go_on_where_they_stopped(tmp_path, monkeypatch):
    """A file system that takes 1000 bytes a call: direct I/O then refuses the unaligned rest
    (EINVAL) and the file goes on through the page cache."""
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pwrite(fd, memoryview(data)[:1000], offset))
    store = CheckpointStore(str(tmp_path))
    entry = store.write_state(1, "op", 0, {"data": np.arange(300_000)})
    monkeypatch.undo()
    store.commit(1, {"op-0": entry}, {"duration_s": 0.1})
    np.testing.assert_array_equal(store.read_state(1, "op", 0)["data"], np.arange(300_000))


def test_a_failed_write_is_reported_as_itself(tmp_path, monkeypatch):
    """The error of a write comes out as a CheckpointError naming it, even when a frame of its
    traceback still holds a view of the writer's buffer (which then cannot be unmapped)."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CheckpointError, match="operator 'op' instance 0 .*No space left on device"):
        CheckpointStore(str(tmp_path)).write_state(1, "op", 0, {"data": np.arange(300_000)})


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_state_files_go_through_the_page_cache_where_direct_io_is_refused(tmp_path, monkeypatch, refused_at):
    """File systems that refuse O_DIRECT at open (EINVAL) or take it and refuse the writes."""
    real_open, real_pwrite, buffered = os.open, os.pwrite, []

    def refusing_open(path, flags, mode=0o777):
        if refused_at == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        buffered.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    store = CheckpointStore(str(tmp_path))
    state = {"data": np.arange(300_000), "n": 7}
    entry = store.write_state(1, "op", 0, state)
    monkeypatch.undo()
    assert len(buffered) == 3
    store.commit(1, {"op-0": entry}, {"duration_s": 0.1})
    back = store.read_state(1, "op", 0)
    np.testing.assert_array_equal(back["data"], state["data"])
    assert back["n"] == 7


@pytest.mark.parametrize("kernel", ["mps_copy_crc32", "mps_copy_crc32_tables"])
def test_checksums_equal_zlibs_at_every_length_offset_and_start(kernel):
    """The C checksum (carry-less folding where the CPU has it, table lookups otherwise)
    against zlib.crc32, copying or not: lengths around the 16- and 64-byte steps, unaligned
    starts, a running checksum to continue."""
    crc32 = getattr(lib, kernel)
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    lengths = list(range(0, 200)) + [255, 256, 257, 1023, 4096 + 15, (1 << 20) + 33, 3 << 20]
    for n in lengths:
        start = int(rng.integers(0, 64)) if n < (3 << 20) else 0
        src, running = data[start : start + n], int(rng.integers(0, 2**32))
        dst = np.zeros(n + 8, np.uint8)
        assert crc32(ffi.from_buffer("uint8_t[]", dst), ffi.from_buffer("uint8_t[]", src), n, running) == \
            zlib.crc32(src, running), n
        np.testing.assert_array_equal(dst[:n], src)
        assert not dst[n:].any(), n  # nothing written past n
        assert crc32(ffi.NULL, ffi.from_buffer("uint8_t[]", src), n, running) == zlib.crc32(src, running), n


def test_checksums_fold_where_the_cpu_multiplies_carry_less():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
    expected = platform.machine() == "x86_64" and "pclmulqdq" in flags and "sse4_1" in flags
    assert lib.mps_crc32_folds() == expected
