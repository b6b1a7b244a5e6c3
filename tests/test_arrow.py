"""Arrow interop: round trips of every type, zero-copy where the layouts agree (checked with
np.shares_memory), nulls both ways, dictionaries, slices, chunks, and the errors."""

import re
import sys

import numpy as np
import pytest

from mpstream import Batch, SchemaError, StringColumn
from mpstream.batch import null_mask, values_of

pa = pytest.importorskip("pyarrow", reason="Arrow interop needs pyarrow: pip install 'mpstream[arrow]'")

COLUMNS = {
    "i8": np.array([-1, 0, 7], np.int8), "u64": np.array([0, 1, 2**64 - 1], np.uint64),
    "i64": np.array([-(2**63), 3, 2**63 - 1]), "f32": np.array([1.5, np.nan, -np.inf], np.float32),
    "f64": np.array([0.1, 0.2, 0.3]), "b": np.array([True, False, True]),
    "ts": np.array(["2026-11-24T00:00:01", "1970-01-01", "2000-02-29T12:00"], "datetime64[us]"),
    "day": np.array(["2026-11-24", "2000-02-29", "1969-12-31"], "datetime64[D]"),
    "td": np.array([1, -5, 0], "timedelta64[ns]"), "s": np.array(["", "héllo", "日本語"]),
}


def test_every_type_round_trips():
    want = Batch(COLUMNS)
    table = want.to_arrow()
    assert table.schema.field("s").type == pa.large_string() and table.schema.field("day").type == pa.date32()
    got = Batch.from_arrow(table)
    assert got.schema == want.schema
    for name in want:
        w, g = want[name], got[name]
        if isinstance(w, StringColumn):
            assert list(g) == list(w)
        else:
            np.testing.assert_array_equal(g, w)
    assert table.column("ts").to_pylist()[0].isoformat() == "2026-11-24T00:00:01"


def test_numeric_time_and_large_string_columns_are_zero_copy_both_ways():
    batch = Batch({k: COLUMNS[k] for k in ("i64", "f64", "ts", "td", "s")})
    table = batch.to_arrow()
    back = Batch.from_arrow(table)
    for name in ("i64", "f64", "ts", "td"):
        assert np.shares_memory(back[name], batch[name]), name
    assert np.shares_memory(back["s"].offsets, batch["s"].offsets)
    assert np.shares_memory(back["s"].data, batch["s"].data)
    native = pa.table({"x": pa.array([1, 2, 3], pa.int64()), "s": pa.array(["a", "bc", None], pa.large_string())})
    b = Batch.from_arrow(native.slice(0, 2))  # no null in the slice: views on Arrow's buffers
    x_buffer = np.frombuffer(native.column("x").chunk(0).buffers()[1], np.int64)
    assert np.shares_memory(b["x"], x_buffer) and b["x"].tolist() == [1, 2] and list(b["s"]) == ["a", "bc"]


def test_a_string_column_is_widened_and_slices_and_chunks_are_read_right():
    arr = pa.array(["zero", "one", "two", "three"], pa.string()).slice(1, 2)
    table = pa.Table.from_batches([pa.record_batch({"s": arr}), pa.record_batch({"s": pa.array(["x"])})])
    got = Batch.from_arrow(table)
    assert list(got["s"]) == ["one", "two", "x"] and got["s"].offsets.dtype == np.int64
    assert Batch.from_arrow(pa.record_batch({"n": pa.array(range(10)).slice(7, 3)}))["n"].tolist() == [7, 8, 9]


def test_nulls_go_both_ways_and_are_stored_as_zero_or_empty():
    table = pa.table({"x": pa.array([1, None, 3]), "s": pa.array(["a", None, "c"]), "b": pa.array([None, True, False]),
                      "t": pa.array([None, 5, 6], pa.timestamp("ms"))})
    got = Batch.from_arrow(table)
    assert got.schema == (("x", "<i8?"), ("s", "utf8?"), ("b", "|b1?"), ("t", "<M8[ms]?"))
    assert got["x"].tolist() == [1, None, 3] and values_of(got["x"]).tolist() == [1, 0, 3]
    assert list(got["s"]) == ["a", None, "c"] and got["b"].tolist() == [None, True, False]
    assert got.to_arrow().to_pydict() == table.to_pydict()
    # a null whose offsets still cover bytes (Arrow allows it): stored empty here
    offsets = np.array([0, 2, 5, 6], np.int32)
    raw = pa.Array.from_buffers(pa.string(), 3, [pa.py_buffer(np.packbits([1, 0, 1], bitorder="little")),
                                                 pa.py_buffer(offsets), pa.py_buffer(b"abXYZc")])
    s = Batch.from_arrow(pa.record_batch({"s": raw}))["s"]
    assert list(s) == ["ab", None, "c"] and bytes(s.data) == b"abc" and null_mask(s).tolist() == [False, True, False]
    nat = Batch({"t": np.array(["2026-01-01", "NaT"], "datetime64[s]")}).to_arrow()
    assert nat.column("t").null_count == 1  # numpy's not-a-time is Arrow's null


def test_dictionary_columns_are_decoded():
    dictionary = pa.array(["b", "a", "b", None]).dictionary_encode()
    got = Batch.from_arrow(pa.table({"d": dictionary, "n": pa.array([3, 1, 3, 2]).dictionary_encode()}))
    assert list(got["d"]) == ["b", "a", "b", None] and got["n"].tolist() == [3, 1, 3, 2]


@pytest.mark.parametrize("array, type_text", [
    (pa.array([[1], [2, 3]]), "list<item: int64>"), (pa.array([1, 2], pa.decimal128(5, 2)), "decimal128(5, 2)"),
    (pa.array([b"x", b"y"]), "binary"), (pa.array([None, None]), "null"),
    (pa.array(np.array([1, 2], np.float16)), "halffloat"),
])
def test_types_mpstream_cannot_carry_are_an_error_naming_the_column(array, type_text):
    with pytest.raises(SchemaError, match=re.escape(f"column 'bad' has Arrow type {type_text},")):
        Batch.from_arrow(pa.table({"ok": pa.array(range(len(array))), "bad": array}))


def test_without_pyarrow_arrow_features_say_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"Batch.to_arrow needs pyarrow: pip install 'mpstream\[arrow\]'"):
        Batch({"x": np.arange(3)}).to_arrow()
