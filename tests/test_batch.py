"""Batches: validation errors name the column; every dtype round-trips through a channel."""

import gc
import pickle
import re

import numpy as np
import pytest

from mpstream import Batch, BatchShapeError, Channel, ChannelError, ChannelReader, ChannelWriter, RecordKind, SchemaError, StringColumn
from mpstream.batch import _trusted


@pytest.fixture
def pipe():
    """(writer, reader) of one in-process channel."""
    with Channel("batch-test", capacity=1 << 20) as chan:
        writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
        yield writer, reader
        writer.close()
        reader.close()


def roundtrip(pipe, batch: Batch) -> Batch:
    writer, reader = pipe
    writer.write(batch)
    with reader.read(timeout=5) as record:
        assert record.kind == RecordKind.DATA
        return record.batch.copy()


def assert_same(got: Batch, want: Batch) -> None:
    assert got.schema == want.schema and got.num_rows == want.num_rows
    for name in want:
        g, w = got[name], want[name]
        if isinstance(w, StringColumn):
            assert g.to_numpy().tolist() == w.to_numpy().tolist()
        else:
            np.testing.assert_array_equal(g, w)


ALL_DTYPES = {
    "b": np.array([True, False, True]),
    "i8": np.array([-128, 0, 127], np.int8),
    "i16": np.array([-(2**15), 1, 2**15 - 1], np.int16),
    "i32": np.array([-(2**31), 2, 2**31 - 1], np.int32),
    "i64": np.array([-(2**63), 3, 2**63 - 1], np.int64),
    "u8": np.array([0, 1, 255], np.uint8),
    "u16": np.array([0, 1, 2**16 - 1], np.uint16),
    "u32": np.array([0, 1, 2**32 - 1], np.uint32),
    "u64": np.array([0, 1, 2**64 - 1], np.uint64),
    "f32": np.array([np.nan, -0.0, np.inf], np.float32),
    "f64": np.array([1e-300, np.nan, -np.inf]),
    "ts": np.array(["2026-11-24T00:00:00.123456789", "NaT", "1970-01-01"], "datetime64[ns]"),
    "day": np.array(["2026-11-24", "2000-02-29", "NaT"], "datetime64[D]"),
    "td": np.array([1, -5, 0], "timedelta64[us]"),
    "s": np.array(["", "héllo wörld ✓", "a" * 1000]),
}


def test_every_dtype_roundtrips(pipe):
    want = Batch(ALL_DTYPES)
    got = roundtrip(pipe, want)
    assert_same(got, want)
    assert got["ts"].dtype == np.dtype("datetime64[ns]") and got["u64"][2] == 2**64 - 1


def test_zero_row_batches_roundtrip_for_every_dtype(pipe):
    want = Batch({name: col[:0] for name, col in ALL_DTYPES.items()})
    got = roundtrip(pipe, want)
    assert_same(got, want)
    assert got.num_rows == 0


def test_all_empty_strings_roundtrip(pipe):
    got = roundtrip(pipe, Batch({"s": ["", "", ""]}))
    assert got["s"].to_numpy().tolist() == ["", "", ""]
    assert got["s"].offsets.tolist() == [0, 0, 0, 0]


def test_batch_without_columns_roundtrips(pipe):
    got = roundtrip(pipe, Batch({}))
    assert got.num_rows == 0 and len(got) == 0


def test_schema_change_midstream_is_sent_again(pipe):
    a = Batch({"x": np.arange(3)})
    b = Batch({"y": np.array(["p", "q"]), "x": np.array([1.5, 2.5])})
    assert_same(roundtrip(pipe, a), a)
    assert_same(roundtrip(pipe, b), b)
    assert_same(roundtrip(pipe, a), a)


def test_non_native_and_strided_columns_roundtrip(pipe):
    big_endian = np.arange(10, dtype=">i4")
    strided = np.arange(40, dtype=np.float64)[::4]
    got = roundtrip(pipe, Batch({"be": big_endian, "st": strided}))
    np.testing.assert_array_equal(got["be"], np.arange(10))
    np.testing.assert_array_equal(got["st"], np.arange(0, 40, 4))
    assert got.schema == (("be", "<i4"), ("st", "<f8"))


def test_columns_are_64_byte_aligned_in_the_ring(pipe):
    writer, reader = pipe
    writer.write(Batch({"a": np.arange(3, dtype=np.int8), "s": ["x", "yy"] + ["z"], "f": np.ones(5)[:3]}))
    with reader.read() as record:
        b = record.batch
        addresses = [b["a"].ctypes.data, b["s"].offsets.ctypes.data, b["s"].data.ctypes.data, b["f"].ctypes.data]
        assert [a % 64 for a in addresses] == [0, 0, 0, 0]


def test_read_views_are_read_only_and_copy_is_owned(pipe):
    writer, reader = pipe
    writer.write(Batch({"x": np.arange(4)}))
    with reader.read() as record:
        view = record.batch["x"]
        with pytest.raises(ValueError, match="read-only"):
            view[0] = 9
        kept = record.batch.copy()
    assert kept["x"].flags.writeable and kept["x"].base is None
    writer.write(Batch({"x": np.full(4, 7)}))  # may overwrite the released record's bytes
    with reader.read() as record:
        np.testing.assert_array_equal(record.batch["x"], np.full(4, 7))
    np.testing.assert_array_equal(kept["x"], np.arange(4))


def test_reading_again_before_release_is_refused(pipe):
    writer, reader = pipe
    writer.write(Batch({"x": np.arange(2)}))
    writer.write(Batch({"x": np.arange(2)}))
    record = reader.read()
    with pytest.raises(ChannelError, match="release the previous record"):
        reader.read()
    record.release()
    with reader.read() as again:
        assert again.batch.num_rows == 2


def test_closing_a_reader_that_holds_a_record_is_safe():
    with Channel("held", capacity=1 << 16) as chan:
        writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
        writer.write(Batch({"x": np.arange(5)}))
        record = reader.read()
        reader.close()
        record.release()  # a no-op now, not a call on a freed handle
        assert not record.held
        writer.close()


def test_views_outlive_detach_and_unlink_without_crashing():
    with Channel("outlive", capacity=1 << 16) as chan:
        writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
        writer.write(Batch({"x": np.arange(100)}))
        with reader.read() as record:
            escaped = record.batch["x"]
        writer.close()
        reader.close()
    del writer, reader, record
    gc.collect()
    assert int(escaped.sum()) == 4950  # the mapping lives as long as a view does


def test_object_arrays_are_refused_naming_the_column():
    with pytest.raises(TypeError, match="column 'payload' is an object array"):
        Batch({"ok": np.arange(2), "payload": np.array([{"a": 1}, None], dtype=object)})
    assert issubclass(SchemaError, TypeError)


def test_ragged_columns_are_refused_naming_the_lengths():
    with pytest.raises(ValueError, match=r"ragged.*'a': 3.*'b': 2"):
        Batch({"a": np.arange(3), "b": np.arange(2)})
    assert issubclass(BatchShapeError, ValueError)


def test_non_1d_columns_are_refused_naming_the_column():
    with pytest.raises(ValueError, match=r"column 'm' has shape \(2, 2\)"):
        Batch({"m": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="column 's' has shape"):
        Batch({"s": np.float64(3.0)})


@pytest.mark.parametrize("bad", [np.zeros(2, np.float16), np.zeros(2, np.complex128), np.zeros(2, "S3"),
                                 np.zeros(2, [("a", "i4")])])
def test_unsupported_dtypes_are_refused_naming_the_column(bad):
    with pytest.raises(TypeError, match=re.escape(f"column 'c' has dtype {bad.dtype}")):
        Batch({"c": bad})


@pytest.mark.parametrize("as_", [list, np.array, lambda v: np.array(v, dtype=object)], ids=["list", "U", "object"])
def test_string_column_matches_python_encoding(as_):
    values = ["", "a", "ß", "日本語", "emoji 🎉", "x" * 300]
    col = StringColumn.from_strings(as_(values))
    assert col.offsets.tolist() == np.cumsum([0] + [len(v.encode()) for v in values]).tolist()
    assert bytes(col.data) == "".join(values).encode()
    assert list(col) == values and col.to_numpy().tolist() == values


def test_strings_that_utf8_cannot_encode_are_refused():
    with pytest.raises(SchemaError, match="lone surrogate"):
        StringColumn.from_strings(np.array(["ok", "\ud800"]))
    with pytest.raises(SchemaError, match="neither str nor None"):
        StringColumn.from_strings(np.array(["a", 3], dtype=object))


CYCLE_SCRIPT = """
import gc
import numpy as np
from mpstream import Batch, Channel, ChannelReader, ChannelWriter
with Channel("cycle", capacity=1 << 16) as chan:
    writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
    writer.write(Batch({"x": np.arange(10)}))
    writer.cycle, reader.cycle = writer, reader  # only the cycle collector can free them
    del writer, reader
    gc.collect()
print("survived")
"""


def test_endpoints_in_reference_cycles_are_collected_safely():
    """The cycle collector may clear the mapping before the ring handle: freeing the handle
    must still not touch unmapped memory (it used to segfault)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", CYCLE_SCRIPT], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "survived"), out.stderr


def test_strings_from_a_sequence_keep_trailing_nul_characters():
    """numpy's U dtype drops trailing NULs: a list must not go through it, or 'a\\x00' and 'a'
    would become one key."""
    col = StringColumn.from_strings(["a\x00", "a", "ß\x00\x00", None])
    assert [col[i] for i in range(3)] == ["a\x00", "a", "ß\x00\x00"]
    assert col.offsets.tolist() == [0, 2, 3, 7, 7]
    batch = Batch({"k": ["a\x00", "a"]})
    assert [batch["k"][i] for i in range(2)] == ["a\x00", "a"]
    back = col.to_numpy()  # numpy's U would drop them: an object array then
    assert back.dtype == object and back.tolist() == ["a\x00", "a", "ß\x00\x00", None]
    assert StringColumn.from_strings(["x", "y"]).to_numpy().dtype.kind == "U"


def test_a_string_column_slices_like_a_sequence():
    col = StringColumn.from_strings(["a", "bb", None, "dddd"])
    assert list(col[1:3]) == ["bb", None] and list(col[::2]) == ["a", None] and list(col[5:]) == []


def test_read_only_views_every_buffer_and_is_a_no_op_on_a_read_only_batch():
    x, s, m = np.arange(4), ["a", "bb", "c", "d"], np.ma.MaskedArray(np.ones(4), mask=[0, 1, 0, 0])
    b = Batch({"x": x, "s": s, "m": m})
    ro = b.read_only()
    assert ro is not b and x.flags.writeable  # the caller's array stays its own
    for buffer in ro.buffers():
        assert not buffer.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            buffer[0] = 1
    assert ro["s"].to_numpy().tolist() == s and ro["m"].mask.tolist() == [False, True, False, False]
    numeric = Batch({"x": x, "y": np.zeros(4)}).read_only()
    assert numeric.read_only() is numeric  # nothing left to protect: no views of views
    sliced = numeric.slice(1, 3)
    assert sliced.read_only() is sliced and sliced["x"].tolist() == [1, 2]
    # an array that owns its memory could be made writeable again by whoever holds it: a view
    owned = np.arange(4)
    owned.flags.writeable = False
    shared = Batch({"x": owned}).read_only()
    assert shared["x"] is not owned
    with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
        shared["x"].flags.writeable = True
    # one writeable column is enough to make views of them all
    assert Batch({"x": numeric["x"], "w": np.zeros(4)}).read_only()["w"].flags.writeable is False


def test_schema_names_each_dtype_exactly_however_often_it_was_seen():
    cols = {"ns": np.arange(2).astype("M8[ns]"), "us": np.arange(2).astype("M8[us]"), "i4": np.arange(2, dtype="<i4"),
            "l": np.arange(2, dtype="l"), "q": np.arange(2, dtype="q"), "f4": np.zeros(2, "f4"), "b": np.ones(2, bool),
            "big": np.arange(2, dtype=">i8"), "m": np.ma.MaskedArray(np.zeros(2), mask=[0, 1]), "s": ["a", None]}
    want = (("ns", "<M8[ns]"), ("us", "<M8[us]"), ("i4", "<i4"), ("l", "<i8"), ("q", "<i8"), ("f4", "<f4"),
            ("b", "|b1"), ("big", "<i8"), ("m", "<f8?"), ("s", "utf8?"))
    for _ in range(2):  # the second time from the dtype-name cache
        b = Batch(cols)
        assert b.schema == want
        assert _trusted({"x": np.arange(2, dtype=">i8")}, 2).schema == (("x", ">i8"),)  # not <i8's name
        assert [buf.dtype.str for buf in b.buffers()] == ["<M8[ns]", "<M8[us]", "<i4", "<i8", "<i8", "<f4", "|b1",
                                                          "<i8", "<f8", "|b1", "<i8", "|u1", "|b1"]


def test_a_pickled_batch_hands_every_buffer_out_of_band_and_comes_back_equal():
    """Pickle protocol 5 gets every buffer out of band, as collected batches travel (numpy
    alone copies datetime64, timedelta64 and masked arrays into the pickle); the batch comes
    back with its dtypes, nulls and strings, by protocol 5 and by the default one."""
    rows = 10_000
    rng = np.random.default_rng(7)
    nulls = rng.random(rows) < 0.2
    batch = Batch({
        "i": rng.integers(0, 100, rows), "f": rng.random(rows), "b": rng.random(rows) < 0.5,
        "t": rng.integers(0, 2**40, rows).astype("datetime64[ms]"),
        "d": rng.integers(0, 1000, rows).astype("timedelta64[us]"),
        "i_null": np.ma.MaskedArray(rng.integers(0, 9, rows), mask=nulls),
        "t_null": np.ma.MaskedArray(rng.integers(0, 2**40, rows).astype("datetime64[s]"), mask=~nulls),
        "s": StringColumn.from_strings(np.array(["a", "ßß", ""])[rng.integers(0, 3, rows)]),
        "s_null": StringColumn.from_strings(np.where(nulls, None, "x").astype(object)),
    }).slice(3, rows - 5)
    buffers = []
    header = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(batch.buffers()) and len(header) < 2000
    for got in (pickle.loads(header, buffers=buffers), pickle.loads(pickle.dumps(batch))):
        assert got.schema == batch.schema and got.num_rows == batch.num_rows == rows - 8
        for name in batch:
            want, have = batch[name], got[name]
            if isinstance(want, StringColumn):
                assert have.to_numpy().tolist() == want.to_numpy().tolist()
            else:
                assert have.dtype == want.dtype
                np.testing.assert_array_equal(np.ma.getdata(have), np.ma.getdata(want))
                np.testing.assert_array_equal(np.ma.getmaskarray(have), np.ma.getmaskarray(want))


def test_a_pickled_batch_keeps_the_values_of_a_column_numpy_changes_the_byte_order_of():
    """Pickled in band, numpy hands a big-endian int64 array back in native order: the batch
    comes back with the values (and the schema of what came back), not the bytes reread."""
    batch = _trusted({"x": np.arange(3, dtype=">i8"), "t": np.arange(3, dtype=">i8").astype(">M8[s]")}, 3)
    for got in (pickle.loads(pickle.dumps(batch)), pickle.loads(pickle.dumps(batch, protocol=5))):
        assert got["x"].tolist() == [0, 1, 2]
        assert got["t"].astype("M8[s]").astype(np.int64).tolist() == [0, 1, 2]
        assert got.schema == tuple((name, col.dtype.str) for name, col in got.items())
