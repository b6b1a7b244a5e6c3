"""Nulls: masked columns through the rings, take/filter/concat, partitioning, aggregates (SQL's
rules: nulls skipped, count(*) vs count(column), null keys grouped together), windows, sinks
and a checkpoint restore, against hand-computed tables."""

import csv

import numpy as np
import pytest

from mpstream import Batch, Channel, ChannelReader, ChannelWriter, Pipeline, SchemaError, StringColumn
from mpstream.batch import null_mask, values_of
from mpstream.testing import Kill, Once, Stall, TestingSource
from mpstream.checkpoint import CheckpointStore
from mpstream.windows import Global, Session, Tumbling

M = np.ma.MaskedArray


def test_a_masked_array_or_none_makes_a_nullable_column_whose_nulls_hold_zero():
    b = Batch({"x": M([5, 7, 9], mask=[False, True, False]), "s": np.array(["a", None, "c"], dtype=object),
               "f": np.ma.masked_invalid([1.0, np.nan, 2.0]), "plain": np.arange(3)})
    assert b.schema == (("x", "<i8?"), ("s", "utf8?"), ("f", "<f8?"), ("plain", "<i8"))
    assert values_of(b["x"]).tolist() == [5, 0, 9] and null_mask(b["x"]).tolist() == [False, True, False]
    assert list(b["s"]) == ["a", None, "c"] and b["s"].to_numpy().tolist() == ["a", None, "c"]
    assert null_mask(b["plain"]) is None and b["x"].sum() == 14  # numpy skips masked values


def test_object_arrays_of_other_values_are_refused_naming_the_column():
    with pytest.raises(SchemaError, match="column 'n' is an object array of other values than str and None"):
        Batch({"n": np.array([1, None], dtype=object)})


def test_nullable_columns_roundtrip_through_a_channel_and_keep_their_nulls():
    want = Batch({"x": M([1, 2, 3], mask=[False, True, False]), "s": StringColumn.from_strings(
        np.array([None, "b", "ccc"], dtype=object)), "t": M(np.array([1, 2, 3], "datetime64[ms]"), mask=[1, 0, 0])})
    with Channel("nulls", capacity=1 << 16) as chan:
        writer, reader = ChannelWriter(chan.name), ChannelReader(chan.name)
        writer.write(want)
        with reader.read(timeout=5) as record:
            got = record.batch.copy()
        writer.close()
        reader.close()
    assert got.schema == want.schema
    for name in want:
        assert null_mask(got[name]).tolist() == null_mask(want[name]).tolist()
    assert got["x"].tolist() == [1, None, 3] and list(got["s"]) == [None, "b", "ccc"]


def test_take_slice_filter_and_concat_keep_the_nulls():
    b = Batch({"x": M([1, 2, 3, 4], mask=[0, 1, 0, 1]), "s": np.array(["a", None, "c", "d"], dtype=object)})
    assert b.take(np.array([3, 0]))["x"].tolist() == [None, 1]
    assert list(b.slice(1, 3)["s"]) == [None, "c"]
    assert b.filter(M([True, True, False, True], mask=[0, 0, 0, 1]))["x"].tolist() == [1, None]  # null: not true
    both = Batch.concat([Batch({"x": np.array([9]), "s": np.array(["z"])}), b])  # plain + nullable: nullable
    assert both.schema == (("x", "<i8?"), ("s", "utf8?")) and both["x"].tolist() == [9, 1, None, 3, None]


ROWS = [  # (k, v): k null = None, v null = None
    (1, 10), (2, None), (None, 5), (1, None), (None, 7), (3, None), (2, 4), (1, 2), (None, None),
]
WANT = {  # k -> (count(*), count(v), sum(v), min(v), mean(v)); a group with no v: nulls
    1: (3, 2, 12, 2, 6.0), 2: (2, 1, 4, 4, 4.0), 3: (1, 0, None, None, None), None: (3, 2, 12, 5, 6.0),
}


def nullable_batches(rows, size):
    out = []
    for i in range(0, len(rows), size):
        part = rows[i:i + size]
        out.append({"k": M([0 if k is None else k for k, _ in part], mask=[k is None for k, _ in part]),
                    "v": M([0 if v is None else v for _, v in part], mask=[v is None for _, v in part])})
    return out


def result_table(r):
    return {k: (c, cv, s, lo, mean) for k, c, cv, s, lo, mean in zip(
        r["k"].tolist(), r["count"].tolist(), r["v_count"].tolist(), r["v_sum"].tolist(), r["v_min"].tolist(),
        r["v_mean"].tolist())}


@pytest.mark.parametrize("salt", [0, 3])
def test_aggregates_skip_nulls_and_group_null_keys_together(salt):
    p = Pipeline()
    (p.source("src", lambda: TestingSource(nullable_batches(ROWS, 2), nullable_batches(ROWS[::-1], 4)), parallelism=2)
      .key_by("k").aggregate("agg", {"*": "count", "v": ["count", "sum", "min", "mean"]}, parallelism=2, salt=salt)
      .collect("out"))
    got = result_table(p.run()["out"])
    twice = {k: (2 * c, 2 * cv, None if s is None else 2 * s, lo, mean) for k, (c, cv, s, lo, mean) in WANT.items()}
    assert got == twice


def test_nulls_survive_a_sigkill_and_restore(tmp_path):
    from mpstream.checkpoint import CheckpointStore

    chk = str(tmp_path / "chk")
    store = CheckpointStore(chk)
    crash = Once(tmp_path, "crash")
    items = nullable_batches(ROWS, 3)
    p = Pipeline()
    (p.source("src", lambda: TestingSource(items[:2] + [Stall(lambda: len(store.complete()) >= 1), Kill(crash)]
                                           + items[2:]))
      .key_by("k").aggregate("agg", {"*": "count", "v": ["count", "sum", "min", "mean"]}).collect("out"))
    with pytest.warns(UserWarning, match="restarting"):
        got = result_table(p.run(checkpoint_dir=chk, checkpoint_interval=0.01)["out"])
    assert crash.fired and got == WANT


def test_windows_group_null_keys_and_skip_null_values():
    p = Pipeline()
    rows = {"k": M([1, 0, 1, 0], mask=[0, 1, 0, 1]), "v": M([1.0, 2.0, 3.0, 4.0], mask=[0, 0, 1, 0]),
            "ts": np.array([1, 2, 3, 15])}
    (p.from_batches("src", [rows]).with_event_time("ts").key_by("k").window(Tumbling(10))
      .aggregate("w", {"v": ["sum", "count"], "*": "count"}).collect("out"))
    out = p.run()["out"]
    got = sorted(zip(out["k"].tolist(), out["window_start"].tolist(), out["v_sum"].tolist(), out["v_count"].tolist(),
                     out["count"].tolist()), key=str)
    assert got == sorted([(1, 0, 1.0, 1, 2), (None, 0, 2.0, 1, 1), (None, 10, 4.0, 1, 1)], key=str)


@pytest.mark.parametrize("assigner", [Tumbling(10), Global(2)], ids=["tumbling", "count"])
@pytest.mark.parametrize("keys", [M([1, 0, 1, 0, 0], mask=[0, 1, 0, 1, 1]),
                                  np.array(["a", None, "a", None, None], dtype=object)], ids=["int", "str"])
def test_a_window_function_gets_the_rows_of_the_null_key(assigner, keys):
    """window().process(fn): the null key's window holds the null-key rows (a masked array
    compares nothing equal to None: they were dropped, fn saw none)."""
    p = Pipeline()
    rows = {"k": keys, "v": np.array([1, 2, 3, 4, 5]), "ts": np.array([1, 2, 3, 4, 15])}
    (p.from_batches("src", [rows]).with_event_time("ts").key_by("k").window(assigner)
      .process("w", lambda key, start, end, r: {"n": [r.num_rows], "v": [int(r["v"].sum())]}).collect("out"))
    out = p.run()["out"]
    k = out["k"].to_numpy() if isinstance(out["k"], StringColumn) else out["k"]
    got = sorted(zip(k.tolist(), out["n"].tolist(), out["v"].tolist()), key=str)
    one = keys.tolist()[0]
    # tumbling: windows [0, 10) and [10, 20); count of 2: rows 2 and 4, then 5 alone at the end
    assert got == sorted([(one, 2, 4), (None, 2, 6), (None, 1, 5)], key=str)


def test_a_null_timestamp_is_an_error_naming_the_column():
    p = Pipeline()
    (p.from_batches("src", [{"k": np.array([1, 2]), "ts": M([1, 2], mask=[0, 1])}]).with_event_time("ts")
      .key_by("k").window(Tumbling(10)).aggregate("w", {"*": "count"}).collect("out"))
    with pytest.raises(Exception, match="event-time column 'ts' is null \\(no timestamp\\) at row 1"):
        p.run()


def test_csv_and_npz_sinks_write_nulls(tmp_path):
    p = Pipeline()
    src = p.from_batches("src", [{"x": M([1, 2], mask=[0, 1]), "s": np.array([None, "b"], dtype=object)}])
    src.to_files("csv", str(tmp_path))
    src.to_files("npz", str(tmp_path), "npz")
    p.run()
    with open(tmp_path / "csv-0.csv") as f:
        assert list(csv.reader(f)) == [["x", "s"], ["1", ""], ["", "b"]]
    saved = np.load(tmp_path / "npz-0.npz")
    assert saved["x"].tolist() == [1, 0] and saved["x.null"].tolist() == [False, True]
    assert saved["s"].tolist() == ["", "b"] and saved["s.null"].tolist() == [True, False]
    back = Pipeline()
    back.from_numpy("src", str(tmp_path / "npz-0.npz")).collect("out")
    out = back.run()["out"]
    assert out.schema == (("x", "<i8?"), ("s", "utf8?")) and out["x"].tolist() == [1, None] and list(out["s"]) == [None, "b"]


def typed_rows(k, ts):
    """Rows of key k (0: the null key) at times ts: a datetime, a timedelta, a nullable float
    and a string column."""
    ts = np.asarray(ts, np.int64)
    n = len(ts)
    return {"k": M(np.full(n, k), mask=np.full(n, k == 0)), "ts": ts.astype("M8[ms]"),
            "v": M(ts * 1.0, mask=ts % 3 == 0), "s": np.where(ts % 2 == 0, "even", "odd"),
            "d": ts.astype("m8[us]")}


TYPED_HEAD = [typed_rows(1, [1, 3]), typed_rows(2, [4, 7]), typed_rows(0, [2, 5]), typed_rows(1, [12]),
              typed_rows(1, [2]), typed_rows(2, [21])]
TYPED_TAIL = [typed_rows(1, [9, 25]), typed_rows(2, [24]), typed_rows(0, [26]), typed_rows(1, [40])]


def typed_window_fn(key, start, end, r):
    assert r["ts"].dtype == np.dtype("M8[ms]") and r["d"].dtype == np.dtype("m8[us]"), (r["ts"].dtype, r["d"].dtype)
    assert isinstance(r["v"], np.ma.MaskedArray)
    ts = r["ts"].view(np.int64)
    assert np.array_equal(np.ma.getmaskarray(r["v"]), ts % 3 == 0)
    assert np.array_equal(r["d"].view(np.int64), ts)
    return {"n": [r.num_rows], "vsum": [float(np.ma.getdata(r["v"]).sum())], "tmax": [ts.max() if len(ts) else -1],
            "odd": [int(sum(s == "odd" for s in r["s"].to_numpy().tolist()))]}


def run_typed_windows(items, chk=None, kind="process"):
    p = Pipeline(channel_capacity=1 << 16)
    w = p.source("src", lambda: TestingSource(items)).with_event_time("ts", max_out_of_orderness=2) \
        .key_by("k").window(Session(4) if kind == "session" else Tumbling(10), allowed_lateness=6)
    (w.process("w", typed_window_fn) if kind == "process" else w.aggregate("w", {"v": ["sum", "count"], "*": "count"})).collect("out")
    opts = {} if chk is None else {"checkpoint_dir": chk, "checkpoint_interval": 0.01, "restart_backoff": 0.01}
    out = p.run(**opts)["out"]
    cols = [c for c in out]
    return sorted(map(str, zip(*[out[c].to_numpy().tolist() if hasattr(out[c], "to_numpy") else out[c].tolist() for c in cols])))


@pytest.mark.parametrize("kind", ["process", "aggregate", "session"])
def test_window_state_with_datetime_and_nullable_columns_survives_a_restore(tmp_path, kind):
    """Windows hold batches of datetime, timedelta and nullable columns in their state (pickled
    as schema and buffers since checkpoint format 7): killed after two checkpoints and
    restored, the job gives what it gives undisturbed, and the window function sees its
    columns' dtypes and nulls as written."""
    chk = str(tmp_path / "chk")
    store = CheckpointStore(chk)
    crash = Once(tmp_path, "crash")
    want = run_typed_windows(TYPED_HEAD + TYPED_TAIL, kind=kind)
    with pytest.warns(UserWarning, match="restarting"):
        got = run_typed_windows(TYPED_HEAD + [Stall(lambda: len(store.complete()) >= 2), Kill(crash)] + TYPED_TAIL, chk, kind=kind)
    assert crash.fired and got == want and want
