"""Channels across processes (fork and spawn): streams arrive intact and in order, END_OF_STREAM
comes after all data, a dead peer is reported instead of hanging, /dev/shm exhaustion is
reported up front, and stale segments can be swept."""

import os
import signal
import struct
import textwrap
import threading

import numpy as np
import pytest
from conftest import run_on_small_tmpfs, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpstream import (
    Batch,
    Channel,
    ChannelClosedError,
    ChannelError,
    ChannelReader,
    ChannelTimeoutError,
    ChannelWriter,
    LayoutError,
    PeerDiedError,
    Pipeline,
    RecordKind,
    RecordTooLargeError,
    SharedMemoryFullError,
    StringColumn,
    sweep_stale_segments,
)
from mpstream._mps import ffi, lib
from mpstream.channel import _Mapping

WORDS = np.array(["", "a", "ß", "日本語", "click", "a-much-longer-domain-name.example.com"])
PRODUCER_WAITING, CONSUMER_WAITING = 256, 512  # parking slots, see csrc/mps_ring.h


def make_batch(rows: int, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    return Batch({
        "seq": np.full(rows, seed, np.int64),
        "value": rng.standard_normal(rows),
        "word": WORDS[rng.integers(0, len(WORDS), rows)],
        "ts": rng.integers(0, 2**40, rows).astype("datetime64[ns]"),
        "flag": rng.random(rows) < 0.5,
    })


def produce(name: str, specs: list[tuple[int, int]]) -> None:
    with ChannelWriter(name) as writer:  # close() sends END_OF_STREAM
        for rows, seed in specs:
            writer.write(make_batch(rows, seed))
            writer.write_watermark(seed)


def consume_all(reader: ChannelReader, timeout: float = 60) -> list:
    """Every record until END_OF_STREAM, batches copied, as (kind, batch or value)."""
    out = []
    while True:
        with reader.read(timeout=timeout) as record:
            if record.kind == RecordKind.END_OF_STREAM:
                return out
            out.append((record.kind, record.batch.copy() if record.batch is not None else record.value))


def assert_batches_equal(got: Batch, want: Batch) -> None:
    assert got.schema == want.schema
    for name in want:
        g, w = got[name], want[name]
        if name == "word":
            assert g.to_numpy().tolist() == w.to_numpy().tolist()
        else:
            np.testing.assert_array_equal(g, w)


specs_strategy = st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 2**31)), min_size=0, max_size=30)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=specs_strategy, capacity_log2=st.integers(18, 20))
def test_random_batch_streams_arrive_intact_and_in_order(method, specs, capacity_log2):
    import multiprocessing

    ctx = multiprocessing.get_context(method)
    with Channel("stream", capacity=1 << capacity_log2) as chan, ChannelReader(chan.name) as reader:
        child = ctx.Process(target=produce, args=(chan.name, specs))
        child.start()
        got = consume_all(reader)
        child.join(30)
        assert child.exitcode == 0
    want_kinds = [RecordKind.DATA, RecordKind.WATERMARK] * len(specs)
    assert [kind for kind, _ in got] == want_kinds
    for (rows, seed), (_, batch), (_, mark) in zip(specs, got[::2], got[1::2]):
        assert_batches_equal(batch, make_batch(rows, seed))
        assert mark == seed


EVERY_DTYPE = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32",
               "float64", "datetime64[s]", "datetime64[ns]", "timedelta64[us]"]


def every_dtype_batch(rows: int, seed: int, nullable: bool = True, strings: bool = True) -> Batch:
    """A column of each numeric dtype; a nullable int and float, plain and nullable strings."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(-100, 100, rows)
    cols = {dtype: raw.astype(dtype) if dtype != "bool" else raw > 0 for dtype in EVERY_DTYPE}
    nulls = rng.random(rows) < 0.3
    if nullable:
        cols["int_nullable"] = np.ma.MaskedArray(raw * 7, mask=nulls)
        cols["float_nullable"] = np.ma.MaskedArray(raw / 3, mask=~nulls)
    if strings:
        words = WORDS[rng.integers(0, len(WORDS), rows)]
        cols["word"] = StringColumn.from_strings(words)
        cols["word_nullable"] = StringColumn.from_strings(np.where(nulls, None, words).astype(object))
    return Batch(cols)


def assert_decoded(got: Batch, want: Batch) -> None:
    assert got.schema == want.schema and got.num_rows == want.num_rows
    for name in want:
        g, w = got[name], want[name]
        if isinstance(w, StringColumn):
            assert g.to_numpy().tolist() == w.to_numpy().tolist(), name
            assert not g.offsets.flags.writeable and not g.data.flags.writeable
        else:
            assert g.dtype == w.dtype, name
            np.testing.assert_array_equal(np.ma.getdata(g), np.ma.getdata(w), err_msg=name)
            np.testing.assert_array_equal(np.ma.getmaskarray(g), np.ma.getmaskarray(w), err_msg=name)
            assert not np.ma.getdata(g).flags.writeable, name


ROW_COUNTS = [0, 1, 3, 7, 64, 999, 1, 900, 5, 0, 333, 64, 999]  # repeats: a fixed-width frame's memoized layouts


def test_every_dtype_decodes_to_what_was_written_at_every_ring_position():
    """Columns are decoded as slices of views of the whole ring: every dtype, nullable or not,
    lands where it was written, read-only, batch after batch as positions move and the ring
    wraps (row counts that leave odd-sized buffers), through schema changes (fixed-width
    frames, whose layouts are memoized per row count, and frames with strings); and so does a
    write of some of a batch's rows (``rows=``), gathered straight into the ring."""
    kinds = [dict(nullable=False, strings=False), dict(nullable=True, strings=False), dict(), dict(strings=False)]
    with Channel("dtypes", capacity=1 << 18) as chan, ChannelWriter(chan.name) as writer, \
            ChannelReader(chan.name) as reader:
        for seed, (kind, rows) in enumerate((kind, rows) for kind in kinds * 2 for rows in ROW_COUNTS):
            want = every_dtype_batch(rows, seed, **kind)
            writer.write(want)
            with reader.read() as record:
                assert_decoded(record.batch, want)
            # some of its rows, in another order: gathered straight into the ring (fixed-width
            # frames) or taken first (frames with strings)
            picked = np.random.default_rng(seed).permutation(rows)[: rows // 2 + 1 if rows else 0]
            writer.write(want, rows=picked)
            with reader.read() as record:
                assert_decoded(record.batch, want.take(picked))
        assert reader.stats()["head_position"] > 1 << 18  # it wrapped
        fixed = every_dtype_batch(5, 0, strings=False)
        for bad in ([0, 5], [-1, 0]):  # a gather clips: out-of-range rows are refused first
            with pytest.raises(IndexError, match=r"rows to write must be in 0\.\.4"):
                writer.write(fixed, rows=np.array(bad))


@pytest.mark.parametrize("damage, says", [("unaligned", "unaligned"), ("rows", "past its end")])
def test_a_data_record_whose_header_misplaces_a_buffer_is_an_error_naming_the_column(damage, says):
    """A header that puts a buffer where its dtype cannot be (a corrupt record) is a
    LayoutError naming the column, never a column of other bytes or of fewer rows."""
    with Channel("damaged", capacity=1 << 16) as chan, ChannelWriter(chan.name) as writer, \
            ChannelReader(chan.name) as reader:
        writer.write(Batch({"n": np.arange(10, dtype=np.int64)}))
        rec, mapping = reader._peeked, _Mapping.open(chan.name)
        assert lib.mps_ring_try_peek(reader._ring, rec) == lib.MPS_RING_OK and not reader._accept(rec)  # SCHEMA
        assert lib.mps_ring_try_peek(reader._ring, rec) == lib.MPS_RING_OK and rec.type == lib.MPS_RECORD_DATA
        payload = lib.MPS_RING_DATA_OFFSET + rec.offset  # uint64 num_rows, then offset, nbytes of "n"
        if damage == "unaligned":
            struct.pack_into("<Q", mapping.buffer, payload + 8, struct.unpack_from("<Q", mapping.buffer, payload + 8)[0] + 4)
        else:
            struct.pack_into("<Q", mapping.buffer, payload, 1 << 40)
        with pytest.raises(LayoutError, match=f"column 'n': .*{says}.* the record is corrupt"):
            reader._accept(rec)


def test_a_corrupt_data_record_read_is_held_so_it_can_be_released_and_reading_goes_on():
    """read() raising LayoutError for a corrupt DATA record leaves it held (as for a DATA record
    before any SCHEMA): releasing the reader's Record skips it, and the next record reads. A
    record peeked in the ring but not held would be stuck: release() a no-op, every read
    'release the previous record'."""
    with Channel("skip-corrupt", capacity=1 << 16) as chan, ChannelWriter(chan.name) as writer, \
            ChannelReader(chan.name) as reader:
        for n in (1, 2, 3):
            writer.write(Batch({"n": np.arange(n, dtype=np.int64)}))
        with reader.read() as record:  # SCHEMA, then the first batch
            assert record.batch.num_rows == 1
        position, rec = ffi.new("uint64_t *", reader.position), ffi.new("struct mps_record *")
        assert lib.mps_ring_scan(reader._ring, position, rec) == lib.MPS_RING_OK and rec.type == lib.MPS_RECORD_DATA
        mapping = _Mapping.open(chan.name)
        struct.pack_into("<Q", mapping.buffer, lib.MPS_RING_DATA_OFFSET + rec.offset, 1 << 40)  # num_rows
        with pytest.raises(LayoutError, match="column 'n': .* the record is corrupt"):
            reader.read(timeout=5)
        assert record.held
        record.release()
        with reader.read(timeout=5) as record:
            assert record.batch["n"].tolist() == [0, 1, 2]
        del mapping


def test_writer_blocks_on_a_full_ring_and_resumes(mp_context):
    """A 64 KiB ring with 2 credits carries 1.3 MB: the writer waits on credit many times, nothing is lost."""
    specs = [(500, seed) for seed in range(60)]
    with Channel("backpressure", capacity=1 << 16, max_records=2) as chan, ChannelReader(chan.name) as reader:
        child = mp_context.Process(target=produce, args=(chan.name, specs))
        child.start()
        got = consume_all(reader)
        child.join(30)
        assert child.exitcode == 0
    assert [int(b["seq"][0]) for kind, b in got if kind == RecordKind.DATA] == list(range(60))


def test_end_of_stream_follows_all_data_and_barriers():
    with Channel("eos", capacity=1 << 16) as chan:
        writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
        writer.write(Batch({"x": np.arange(5)}))
        writer.write_barrier(7)
        writer.write(Batch({"x": np.arange(2)}))
        writer.close()
        got = consume_all(reader, timeout=5)
        reader.close()
    assert [kind for kind, _ in got] == [RecordKind.DATA, RecordKind.BARRIER, RecordKind.DATA]
    assert got[1][1] == 7


def _write_one_then_hang(name: str, ready) -> None:
    writer = ChannelWriter(name)
    writer.write(Batch({"x": np.arange(3)}))
    ready.set()
    threading.Event().wait()  # until SIGKILLed


def _read_one_then_hang(name: str, ready) -> None:
    reader = ChannelReader(name)
    with reader.read(timeout=30):
        pass
    ready.set()
    threading.Event().wait()  # until SIGKILLed


def _kill_when_parked(name: str, flag_offset: int, pid: int) -> threading.Thread:
    """SIGKILLs pid once this process's side of the channel sleeps on its futex."""
    mapping = _Mapping.open(name)

    def run():
        wait_until(lambda: struct.unpack_from("<I", mapping.buffer, flag_offset)[0] == 1, what="a parked waiter")
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _start_peer(mp_context, target, name: str):
    """(child process running target(name, ready), its ready event), started."""
    ready = mp_context.Event()
    child = mp_context.Process(target=target, args=(name, ready))
    child.start()
    return child, ready


def test_reader_parked_on_a_writer_that_is_killed_gets_peer_died(mp_context):
    with Channel("dead-writer", capacity=1 << 16) as chan, ChannelReader(chan.name) as reader:
        child, ready = _start_peer(mp_context, _write_one_then_hang, chan.name)
        assert ready.wait(30)
        with reader.read(timeout=5) as record:
            assert record.batch.num_rows == 3
        killer = _kill_when_parked(chan.name, CONSUMER_WAITING, child.pid)
        with pytest.raises(PeerDiedError, match="writer process died"):
            reader.read(timeout=30)
        killer.join()
        child.join()
        assert child.exitcode == -signal.SIGKILL


def test_writer_blocked_on_a_reader_that_is_killed_gets_peer_died(mp_context):
    with Channel("dead-reader", capacity=1 << 16) as chan, ChannelWriter(chan.name) as writer:
        child, ready = _start_peer(mp_context, _read_one_then_hang, chan.name)
        writer.write(Batch({"x": np.arange(10)}))
        assert ready.wait(30)
        killer = _kill_when_parked(chan.name, PRODUCER_WAITING, child.pid)
        with pytest.raises(PeerDiedError, match="reader process died"):
            for _ in range(10_000):  # fills the ring, then blocks until the reader is gone
                writer.write(Batch({"x": np.arange(1000)}), timeout=30)
        killer.join()
        child.join()


def test_writer_that_died_before_the_read_is_detected(mp_context):
    with Channel("already-dead", capacity=1 << 16) as chan, ChannelReader(chan.name) as reader:
        child, ready = _start_peer(mp_context, _write_one_then_hang, chan.name)
        assert ready.wait(30)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with reader.read(timeout=5):  # what was committed before the death is still delivered
            pass
        with pytest.raises(PeerDiedError):
            reader.read(timeout=30)


def test_write_to_a_closed_reader_is_refused():
    with Channel("closed", capacity=1 << 12) as chan, ChannelWriter(chan.name) as writer:
        ChannelReader(chan.name).close()
        with pytest.raises(ChannelClosedError, match="reader closed its end"):
            for _ in range(100):
                writer.write(Batch({"x": np.arange(100)}), timeout=5)


def test_out_of_order_calls_say_what_to_do_on_each_side():
    """A writer whose record is still claimed, and a reader holding its record, get errors that
    name their own case (not each other's)."""
    with Channel("order", capacity=1 << 16) as chan, ChannelWriter(chan.name) as writer, \
            ChannelReader(chan.name) as reader:
        writer.write(Batch({"x": np.arange(2)}))
        assert lib.mps_ring_try_claim(writer._ring, lib.MPS_RECORD_DATA, 8, ffi.new("uint64_t *")) == lib.MPS_RING_OK
        with pytest.raises(ChannelError, match="a record is still claimed"):
            writer.write(Batch({"x": np.arange(2)}))
        lib.mps_ring_abort(writer._ring)
        with reader.read(timeout=5):
            with pytest.raises(ChannelError, match="release the previous record before reading the next"):
                reader.read(timeout=5)


def test_read_times_out_with_a_specific_error():
    with Channel("quiet", capacity=1 << 12) as chan, ChannelReader(chan.name) as reader:
        ChannelWriter(chan.name)  # attached, alive, silent
        with pytest.raises(ChannelTimeoutError, match="raise the timeout"):
            reader.read(timeout=0.05)


def test_a_blocking_call_keeps_its_wait_on_its_clock_and_one_that_need_not_wait_leaves_it_alone():
    """The C side keeps the time: a read that waits goes on the reader's clock as input, a
    write that waits for space on the writer's as credit, both ended when the call returns;
    a read or write that finds its record or space at once does not touch the words."""
    import time

    from mpstream.channel import WaitClock

    batch = Batch({"x": np.arange(64, dtype=np.int64)})
    with Channel("clocked", capacity=1 << 12) as chan, ChannelReader(chan.name) as reader, \
            ChannelWriter(chan.name) as writer:
        began = time.monotonic()
        with pytest.raises(ChannelTimeoutError):
            reader.read(timeout=0.02)
        elapsed = time.monotonic() - began
        waited = reader.clock.seconds(WaitClock.INPUT)
        assert 0.9 * 0.02 <= waited <= elapsed and reader.clock.seconds(WaitClock.CREDIT) == 0
        assert reader.clock.waiting_now == 0 and reader.clock.words[0] % 2 == 0  # ended, not mid-change

        before = bytes(writer.clock.words) + bytes(reader.clock.words)
        writer.write(batch)  # space at once
        reader.read(timeout=1).release()  # a record at once
        assert bytes(writer.clock.words) + bytes(reader.clock.words) == before

        with pytest.raises(ChannelTimeoutError):
            while True:  # fills the ring, then waits for space that never comes
                writer.write(batch, timeout=0.02)
        assert writer.clock.seconds(WaitClock.CREDIT) >= 0.9 * 0.02
        assert writer.clock.seconds(WaitClock.INPUT) == 0 and writer.clock.waiting_now == 0


def test_a_read_interrupted_by_signals_still_times_out_on_time_and_ends_its_wait():
    """Signals end a slice of a wait (Python runs the handler) and the wait goes on for the
    rest of its timeout; a handler that raises ends it. Either way the clock's wait ends."""
    import time

    from mpstream.channel import WaitClock

    hits = []
    old = signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
    try:
        with Channel("sig", capacity=1 << 12) as chan, ChannelReader(chan.name, nap_ns=10**9) as reader:
            signal.setitimer(signal.ITIMER_REAL, 0.003, 0.003)
            began = time.monotonic()
            with pytest.raises(ChannelTimeoutError):
                reader.read(timeout=0.1)
            elapsed = time.monotonic() - began
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert len(hits) > 5 and elapsed >= 0.1
            assert reader.clock.waiting_now == 0 and reader.clock.words[0] % 2 == 0
            assert 0.05 <= reader.clock.seconds(WaitClock.INPUT) <= elapsed  # the slices, not the handlers between

            def interrupt(*a):
                raise KeyboardInterrupt

            signal.signal(signal.SIGALRM, interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.02)
            with pytest.raises(KeyboardInterrupt):
                reader.read(timeout=5)
            assert reader.clock.waiting_now == 0 and reader.clock.words[0] % 2 == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_nan_timeout_is_refused_and_an_infinite_one_waits_for_the_record():
    batch = Batch({"x": np.arange(3)})
    with Channel("nan", capacity=1 << 12) as chan, ChannelReader(chan.name) as reader, \
            ChannelWriter(chan.name) as writer:
        with pytest.raises(ValueError, match="NaN"):
            reader.read(timeout=float("nan"))
        writer.write(batch)
        with reader.read(timeout=float("inf")) as record:
            assert record.batch["x"].tolist() == [0, 1, 2]


def test_a_released_wait_clock_keeps_no_time_and_lets_its_memory_go():
    from mpstream.channel import WaitClock

    backing = bytearray(8 * WaitClock.WORDS)
    clock = WaitClock(memoryview(backing).cast("q"))
    clock.begin(WaitClock.INPUT)
    clock.end()
    kept = bytes(backing)
    clock.release()
    clock.release()  # twice: nothing more to let go
    clock.begin(WaitClock.INPUT)  # a NULL clock: no time kept
    clock.end()
    assert bytes(backing) == kept
    backing.extend(b"x")  # no export holds the bytearray any more
    with pytest.raises(ValueError, match="5 int64 words"):
        WaitClock(memoryview(bytearray(16)).cast("q"))
    with pytest.raises(BufferError):
        WaitClock(memoryview(bytes(40)).cast("q"))  # read-only


def test_a_write_that_fails_while_filling_its_record_publishes_nothing_and_writing_goes_on(monkeypatch):
    """A DATA record whose buffers fail to go in (an exception, Ctrl-C) is aborted: the reader
    never sees it, and the writer's claim is given back, so the next write goes through."""
    from mpstream.batch import Frame

    real = Frame.__dict__["write"].__func__

    def fails_half_way(*args):
        real(*args)
        raise KeyboardInterrupt

    with Channel("aborted", capacity=1 << 16) as chan, ChannelWriter(chan.name) as writer, \
            ChannelReader(chan.name) as reader:
        writer.write(Batch({"x": np.arange(3)}))
        with monkeypatch.context() as patch:
            patch.setattr(Frame, "write", staticmethod(fails_half_way))
            with pytest.raises(KeyboardInterrupt):
                writer.write(Batch({"x": np.arange(100, 105)}))
        writer.write(Batch({"x": np.arange(7, 9)}))
        writer.close()
        got = consume_all(reader, timeout=5)
    assert [(kind, b["x"].tolist()) for kind, b in got] == [(RecordKind.DATA, [0, 1, 2]), (RecordKind.DATA, [7, 8])]


def test_record_larger_than_half_the_ring_is_refused_with_advice():
    with Channel("small", capacity=1 << 12) as chan, ChannelWriter(chan.name) as writer:
        with pytest.raises(RecordTooLargeError, match="split the batch or create the channel with a larger capacity"):
            writer.write(Batch({"x": np.zeros(1024)}))


def _attach_writer_then_hang(name: str, ready) -> None:
    ChannelWriter(name)
    ready.set()
    threading.Event().wait()


def test_second_live_writer_is_refused(mp_context):
    with Channel("taken", capacity=1 << 12) as chan:
        ready = mp_context.Event()
        child = mp_context.Process(target=_attach_writer_then_hang, args=(chan.name, ready))
        child.start()
        assert ready.wait(30)
        with pytest.raises(LayoutError, match="exactly one writer"):
            ChannelWriter(chan.name)
        child.kill()
        child.join()
        ChannelWriter(chan.name).close()  # the dead writer's slot can be taken over


def test_segment_of_another_layout_version_is_refused():
    with Channel("version", capacity=1 << 12) as chan:
        mapping = _Mapping.open(chan.name)
        struct.pack_into("<I", mapping.buffer, 8, lib.MPS_RING_LAYOUT_VERSION + 1)
        with pytest.raises(LayoutError, match="another mpstream layout version"):
            ChannelReader(chan.name)
        struct.pack_into("<Q", mapping.buffer, 0, 0)
        with pytest.raises(LayoutError, match="not an mpstream ring"):
            ChannelReader(chan.name)


def mps_segments() -> set[str]:
    """The segments this process made in /dev/shm (a segment's name starts with its creator's
    pid; multiprocessing's semaphores and other processes' segments come and go beside them)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"mps.{os.getpid()}.")}


def test_full_dev_shm_is_reported_before_anything_is_created():
    before = mps_segments()
    with pytest.raises(SharedMemoryFullError, match="channel 'huge' needs 4194304.0 MiB .* enlarge /dev/shm"):
        Channel("huge", capacity=1 << 42)
    p = Pipeline(channel_capacity=1 << 40)  # 4 channels of 1 TiB: their rings would not all fit
    p.from_arrays("src", {"x": np.arange(10)}, parallelism=2).rebalance().map("m", lambda b: b, parallelism=2).collect("out")
    with pytest.raises(SharedMemoryFullError, match=r"job 'job' \(4 channels\) needs 4194304.0 MiB"):
        p.run()
    assert mps_segments() == before


SMALL_TMPFS_SCRIPT = textwrap.dedent("""
    import os
    import numpy as np
    from mpstream import Batch, Channel, ChannelWriter, SharedMemoryFullError
    try:
        Channel("too-big", capacity=1 << 23)           # 8 MiB: more than the 6 MiB tmpfs has
    except SharedMemoryFullError as exc:
        print("FULL AT CREATE", exc)
    batch = Batch({"x": np.zeros(1 << 16)})             # 512 KiB
    with Channel("a", capacity=1 << 22) as a, Channel("b", capacity=1 << 22) as b:  # 4 MiB each
        print("SEGMENTS", len(os.listdir("/dev/shm")))
        ChannelWriter(a.name).write(batch)              # reserves as it goes: a 256 KiB chunk or more
        first = ChannelWriter(a.name)
        for _ in range(6):                               # 3.5 MiB of ring a reserved
            first.write(batch)
        second = ChannelWriter(b.name)
        written = 0
        try:
            for _ in range(7):
                second.write(batch)
                written += 1
        except SharedMemoryFullError as exc:
            print("FULL AT WRITE", written, exc)
    print("SEGMENTS", len(os.listdir("/dev/shm")))
""")


def test_full_dev_shm_in_a_real_small_tmpfs():
    """/dev/shm replaced by a 6 MiB tmpfs in a private mount namespace (needs root): a ring
    too large for it is refused at creation; two rings that fit one at a time are created, and
    the writer that finds the tmpfs full gets SharedMemoryFullError, not a SIGBUS."""
    out = run_on_small_tmpfs(SMALL_TMPFS_SCRIPT, "/dev/shm", "6m")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("FULL AT CREATE channel 'too-big' needs 8.0 MiB")
    assert lines[1] == "SEGMENTS 2"
    full, written = lines[2].split()[:4], int(lines[2].split()[3])
    assert full[:3] == ["FULL", "AT", "WRITE"] and 1 <= written < 7, lines[2]
    assert "ran out while the writer reserved the ring's next pages" in lines[2]
    assert lines[3] == "SEGMENTS 0"


def test_sweep_removes_segments_of_dead_creators_only(mp_context):
    child = mp_context.Process(target=int)
    child.start()
    child.join()
    out = ffi.new("struct mps_segment **")
    stale = f"/mps.{child.pid}.deadbeef.left-behind"
    assert lib.mps_segment_create(stale.encode(), 4096, 4096, out) == 0
    lib.mps_segment_release(out[0])
    with Channel("live", capacity=1 << 12) as live:
        swept = sweep_stale_segments()
        assert stale[1:] in swept
        assert live.name[1:] not in swept and os.path.exists(f"/dev/shm{live.name}")
    assert not os.path.exists(f"/dev/shm{stale}")
