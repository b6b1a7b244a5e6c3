"""The engine: operators and partitioners against numpy references at parallelism 1, 2 and 4;
per-key order; salted == unsalted; file sources and sinks."""

import csv
import multiprocessing
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpstream import StringColumn
from mpstream.aggregate import Combiner
from mpstream.operators import Operator
from mpstream.errors import OperatorError
from mpstream.pipeline import Pipeline
from mpstream.sources import Source
from mpstream.testing import TestingSource

WORDS = np.array(["", "a", "ß", "hot.example.com", "x.org", "日本"])
FAST = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def columns(seed, rows, string_keys):
    rng = np.random.default_rng(seed)
    key = WORDS[rng.integers(0, len(WORDS), rows)] if string_keys else rng.integers(0, 20, rows)
    return {"key": key, "id": np.arange(rows), "v": rng.integers(-1000, 1000, rows).astype(np.float64)}


def rows_of(batch, *names):
    if batch.num_rows == 0:  # nothing collected: an empty batch without columns
        return []
    cols = [batch[n].to_numpy() if isinstance(batch[n], StringColumn) else batch[n] for n in names]
    return sorted(zip(*(c.tolist() for c in cols)))


@FAST
@given(seed=st.integers(0, 2**31), rows=st.sampled_from([0, 1, 700, 5000]), parallelism=st.sampled_from([1, 2, 4]))
def test_map_filter_flat_map_match_numpy(seed, rows, parallelism):
    data = columns(seed, rows, string_keys=True)
    p = Pipeline(channel_capacity=1 << 20)
    (p.from_arrays("src", data, parallelism=parallelism, batch_size=512)
      .map("scale", lambda b: {"key": b["key"], "id": b["id"], "v": b["v"] * 3}, parallelism=2)
      .filter("positive", lambda b: b["v"] > 0, parallelism=parallelism)
      .flat_map("twice", lambda b: [b, b.slice(0, 1)])
      .collect("out"))
    got = p.run()["out"]
    keep = data["v"] * 3 > 0
    want = list(zip(data["id"][keep].tolist(), (data["v"][keep] * 3).tolist()))
    # flat_map re-emits the first row of every batch it sees: those rows appear twice
    assert set(rows_of(got, "id", "v")) == set(want)
    assert got.num_rows >= len(want)


@FAST
@given(seed=st.integers(0, 2**31), rows=st.sampled_from([0, 3, 4000]), parallelism=st.sampled_from([1, 2, 4]),
       string_keys=st.booleans())
def test_keyed_aggregate_salted_and_unsalted_match_numpy(seed, rows, parallelism, string_keys):
    data = columns(seed, rows, string_keys)
    results = []
    for salt in (0, 3):
        p = Pipeline(channel_capacity=1 << 20)
        (p.from_arrays("src", data, parallelism=2, batch_size=300)
          .key_by("key").aggregate("agg", {"v": ["sum", "min", "max", "mean"], "*": "count"},
                                   parallelism=parallelism, salt=salt)
          .collect("out"))
        results.append(rows_of(p.run()["out"], "key", "v_sum", "v_min", "v_max", "count"))
    keys = data["key"].tolist()
    want = []
    for k in sorted(set(keys)):
        vs = data["v"][np.array(keys) == k] if rows else np.zeros(0)
        want.append((k, float(vs.sum()), float(vs.min()), float(vs.max()), len(vs)))
    assert results[0] == results[1] == sorted(want)  # integral float values: sums are exact


def sums_by_key(batch):
    return {int(k): (float(s), int(c)) for k, s, c in zip(batch["k"], batch["v_sum"], batch["count"])}


@pytest.mark.parametrize("emit, delay, partial_rows", [("updates", 0, 4), ("updates", 3600, 3), ("final", 0, 3)])
def test_combiner_latency_bound_sets_how_often_partials_go_on(emit, delay, partial_rows):
    """Batches [1, 1, 2] and [1, 3, 3]: emitting updates with a bound of 0 s, each batch's
    partials go on at once (2 + 2 rows into the final stage); with an hour, one flush at the
    end (3 rows). Final results come at the end: the bound plays no part (3 rows)."""
    p = Pipeline()
    (p.from_arrays("src", {"k": np.array([1, 1, 2, 1, 3, 3]), "v": np.arange(6.0)}, batch_size=3)
      .key_by("k").aggregate("agg", {"v": "sum", "*": "count"}, salt=2, combiner_delay_s=delay, emit=emit)
      .collect("out"))
    result = p.run()
    assert sums_by_key(result["out"]) == {1: (4.0, 3), 2: (2.0, 1), 3: (9.0, 2)}
    assert [s.records_in for s in result.operators if s.name == "agg"] == [partial_rows]


def test_a_negative_combiner_delay_is_refused_with_the_operator_named():
    with pytest.raises(ValueError, match="operator 'agg': combiner_delay_s must be >= 0"):
        Pipeline().from_arrays("src", {"k": np.arange(3)}).key_by("k").aggregate(
            "agg", {"*": "count"}, salt=2, combiner_delay_s=-1)


def test_combiner_hands_on_its_rows_by_their_due_time_without_more_input(monkeypatch):
    """A map's combiner holds its rows at most its latency bound even when no more input
    comes to trigger a flush: the source waits for that flush before its second batch (so the
    map and its combiner get a process of their own: chain=False)."""
    flushed = multiprocessing.get_context("fork").Event()
    flush = Combiner.flush

    def observed_flush(self, last=False):
        partials = flush(self, last)
        if partials is not None:
            flushed.set()
        return partials

    monkeypatch.setattr(Combiner, "flush", observed_flush)  # forked workers inherit it

    def two_batches(instance, offset):
        if offset == 1:
            assert flushed.wait(60), "the map's combiner held its rows past their due time"
        return {"k": np.array([1, 1, 2]), "v": np.ones(3)} if offset < 2 else None

    p = Pipeline()
    (p.from_generator("src", two_batches).map("m", lambda b: b, chain=False).key_by("k")
      .aggregate("agg", {"v": "sum", "*": "count"}, salt=2, combiner_delay_s=0.01, emit="updates").collect("out"))
    result = p.run()
    assert sums_by_key(result["out"]) == {1: (4.0, 4), 2: (2.0, 2)}
    assert [s.records_in for s in result.operators if s.name == "agg"] == [4]  # two flushes


class TagInstance(Operator):
    def process(self, batch):
        return {"key": batch["key"], "instance": np.full(batch.num_rows, self.ctx.instance)}


@pytest.mark.parametrize("parallelism", [1, 2, 4])
def test_hash_range_and_custom_partitioners_route_keys(parallelism):
    keys = np.arange(400) % 50
    bounds = np.linspace(0, 50, parallelism + 1)[1:-1]
    routes = {
        "hash": ({}, lambda k: None),
        "range": ({"bounds": bounds}, lambda k: int(np.searchsorted(bounds, k, side="right"))),
        "custom": ({}, lambda k: k % parallelism),
    }
    for kind, (kwargs, expect) in routes.items():
        p = Pipeline(channel_capacity=1 << 20)
        part = (lambda b, n: b["key"] % n) if kind == "custom" else kind
        (p.from_arrays("src", {"key": keys}, parallelism=2, batch_size=64)
          .key_by("key", part, **kwargs).process("tag", TagInstance, parallelism=parallelism)
          .collect("out"))
        out = p.run()["out"]
        owner = {}
        for k, inst in zip(out["key"].tolist(), out["instance"].tolist()):
            assert owner.setdefault(k, inst) == inst, f"{kind}: key {k} went to two instances"
            if expect(k) is not None:
                assert inst == expect(k), kind
        assert sorted(out["key"].tolist()) == sorted(keys.tolist())


class TagSource(Operator):
    """Chained to a source instance (forward, same parallelism): its rows with the instance."""

    def process(self, batch):
        return {**batch, "source": np.full(batch.num_rows, self.ctx.instance)}


def test_records_of_a_key_keep_their_order_per_source_instance():
    n = 20_000
    p = Pipeline(channel_capacity=1 << 16)  # small rings: many blocked writes
    (p.from_arrays("src", {"key": np.arange(n) % 7, "seq": np.arange(n)}, parallelism=2, batch_size=100)
      .process("tag", TagSource)
      .key_by("key").map("pass", lambda b: b, parallelism=3)
      .map("again", lambda b: b)  # forward: instance i to i
      .collect("out"))
    out = p.run()["out"]
    for k in range(7):
        seqs = out["seq"][out["key"] == k]
        assert sorted(seqs.tolist()) == list(range(k, n, 7))
        for source in (0, 1):  # each instance reads its batches in order
            mine = seqs[out["source"][out["key"] == k] == source]
            assert (np.diff(mine) > 0).all(), f"key {k}: order from source instance {source} was lost"


def test_union_reads_every_input():
    p = Pipeline(channel_capacity=1 << 20)
    a = p.from_arrays("a", {"x": np.arange(100)})
    b = p.from_arrays("b", {"x": np.arange(100, 150)}, parallelism=2)
    a.union(b).map("id", lambda batch: batch, parallelism=2).collect("out")
    assert sorted(p.run()["out"]["x"].tolist()) == list(range(150))


def test_generator_csv_and_numpy_sources_and_file_sinks(tmp_path):
    csv_path = tmp_path / "in.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["domain", "bytes"])
        w.writerows([["a.com", 10], ["b.org", 5], ["a.com", 1]])
    npz_path = tmp_path / "in.npz"
    np.savez(npz_path, domain=np.array(["c.net", "a.com"]), bytes=np.array([7, 2]))

    def gen(instance, offset):
        return None if offset >= 2 else {"domain": np.array(["g.io"]), "bytes": np.array([offset + 1])}

    p = Pipeline(channel_capacity=1 << 20)
    s = p.from_csv("csv", str(csv_path)).union(p.from_numpy("npz", str(npz_path)), p.from_generator("gen", gen))
    agg = s.key_by("domain").aggregate("sum", {"bytes": "sum"}, parallelism=2)
    agg.to_files("files", str(tmp_path / "out"))
    agg.collect("out")
    result = p.run()
    want = [("a.com", 13), ("b.org", 5), ("c.net", 7), ("g.io", 3)]
    assert rows_of(result["out"], "domain", "bytes_sum") == want
    written = []
    for name in sorted(os.listdir(tmp_path / "out")):
        with open(tmp_path / "out" / name) as f:
            written += [(r["domain"], int(r["bytes_sum"])) for r in csv.DictReader(f)]
    assert sorted(written) == want


def test_bad_pipelines_are_refused_up_front():
    p = Pipeline()
    p.from_arrays("x", {"a": np.arange(3)})
    with pytest.raises(ValueError, match="operator name 'x' is used twice"):
        p.from_arrays("x", {"a": np.arange(3)})
    with pytest.raises(TypeError, match="column 'o' is an object array"):
        p.from_arrays("y", {"o": np.array([None, 1], dtype=object)})
    with pytest.raises(ValueError, match="backpressure must be 'block' or 'drop'"):
        p.from_arrays("z", {"a": np.arange(3)}).map("m", lambda b: b, backpressure="spill")


def test_batches_larger_than_a_channel_are_split_in_order():
    n = 50_000  # 64K-row batches of ~1.2 MB through 64 KiB rings (a record holds 32 KiB)
    p = Pipeline(channel_capacity=1 << 16)
    (p.from_arrays("src", {"key": np.arange(n) % 3, "seq": np.arange(n), "s": np.array(["abc"] * n)}, batch_size=65536)
      .key_by("key").map("m", lambda b: b, parallelism=2).collect("out"))
    out = p.run()["out"]
    assert sorted(out["seq"].tolist()) == list(range(n))
    for k in range(3):
        assert (np.diff(out["seq"][out["key"] == k]) > 0).all()


@pytest.mark.parametrize("salt", [0, 3])
def test_aggregate_over_a_union_of_int_and_float_columns_matches_numpy(salt):
    """Two sources of one schema but for the dtype of v (a CSV of integer prices next to one of
    decimal prices): the accumulators widen to float64, salted or not."""
    p = Pipeline(channel_capacity=1 << 20)
    ints = p.from_arrays("ints", {"k": np.array([1, 1, 2, 3] * 50), "v": np.arange(200)}, batch_size=30)
    floats = p.from_arrays("floats", {"k": np.array([1, 2, 2, 4] * 50), "v": np.arange(200) + 0.5}, batch_size=30)
    (ints.union(floats).key_by("k")
     .aggregate("agg", {"v": ["sum", "min", "max", "mean"], "*": "count"}, parallelism=2, salt=salt)
     .collect("out"))
    out = p.run()["out"]
    keys = np.concatenate([np.array([1, 1, 2, 3] * 50), np.array([1, 2, 2, 4] * 50)])
    values = np.concatenate([np.arange(200), np.arange(200) + 0.5])
    want = sorted((int(k), values[keys == k].sum(), values[keys == k].min(), values[keys == k].max(),
                   values[keys == k].mean(), int((keys == k).sum())) for k in np.unique(keys))
    assert rows_of(out, "k", "v_sum", "v_min", "v_max", "v_mean", "count") == want
    assert out["v_sum"].dtype == np.float64


def test_a_column_that_changes_from_number_to_string_fails_naming_operator_and_column():
    from mpstream import Batch, OperatorError

    p = Pipeline(channel_capacity=1 << 20)
    (p.from_batches("src", [Batch({"k": np.array([1]), "v": np.array([1.5])}),
                            Batch({"k": np.array([1]), "v": np.array(["oops"])})])
     .key_by("k").aggregate("agg", {"v": "sum"}).collect("out"))
    with pytest.raises(OperatorError, match=r"(?s)operator 'agg'.*column 'v'"):
        p.run()


EMPTY = {"k": np.zeros(0, np.int64), "v": np.zeros(0)}


def test_collected_batches_come_back_whole_out_of_band():
    """A collect sink's batches travel with their buffers out of band (mpstream.messages):
    numbers, strings and nulls, in batches of several MB, arrive exactly."""
    n = 300_000
    names = np.array([f"user-{i % 977}" for i in range(n)])
    nullable = np.ma.MaskedArray(np.arange(n), mask=np.arange(n) % 5 == 0)
    p = Pipeline()
    p.from_arrays("src", {"k": np.arange(n), "v": np.arange(n) / 3, "name": names, "n": nullable},
                  parallelism=2, batch_size=100_000).collect("out")
    out = p.run()["out"]
    order = np.argsort(out["k"])
    assert out["k"][order].tolist() == list(range(n))
    assert np.array_equal(out["v"][order], np.arange(n) / 3)
    assert out["name"].to_numpy()[order].tolist() == names.tolist()
    assert out["n"][order].tolist() == nullable.tolist()


def test_a_collected_result_is_concatenated_once():
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(10_000)}, parallelism=2, batch_size=1000).collect("out")
    result = p.run()
    assert len(result.collected["out"]) > 1
    out = result["out"]
    assert sorted(out["x"].tolist()) == list(range(10_000))
    assert result["out"] is out and len(result.collected["out"]) == 1  # the second read copies nothing
    out["x"].sort()  # the caller's own arrays: writable


def test_a_result_of_one_batch_is_writable_too():
    """A single collected batch arrives as read-only views (its buffers came out of band from a
    ring): result[sink] copies it once, so the caller owns what it gets, as with several."""
    p = Pipeline()
    p.from_arrays("src", {"x": np.arange(10)[::-1].copy(), "s": np.array(["b", "a"] * 5)}).collect("out")
    result = p.run()
    assert len(result.collected["out"]) == 1
    out = result["out"]
    out["x"].sort()
    assert out["x"].tolist() == list(range(10)) and result["out"] is out
    assert all(buffer.flags.writeable for buffer in out.buffers())


@pytest.mark.parametrize("salt", [0, 2])
@pytest.mark.parametrize("case", ["empty arrays", "a filter that keeps nothing", "a header-only CSV"])
def test_an_empty_result_keeps_its_columns_and_dtypes(tmp_path, case, salt):
    p = Pipeline(channel_capacity=1 << 20)
    if case == "empty arrays":
        src = p.from_arrays("src", EMPTY, parallelism=2)
    elif case == "a filter that keeps nothing":
        src = p.from_arrays("src", {"k": np.arange(10), "v": np.ones(10)}).filter("none", lambda b: b["v"] > 5)
    else:
        (tmp_path / "in.csv").write_text("k,v\n")  # no value to infer types from: given
        src = p.from_csv("src", str(tmp_path / "in.csv"), schema={"k": "int64", "v": "float64"})
    src.map("same", lambda b: b).collect("rows")
    src.key_by("k").aggregate("agg", {"v": ["sum", "max", "mean"], "*": "count"}, parallelism=2, salt=salt).collect("out")
    result = p.run()
    rows, out = result["rows"], result["out"]
    assert rows.num_rows == 0 and rows.schema[0] == ("k", "<i8")
    assert out.num_rows == 0
    assert [name for name, _ in out.schema] == ["k", "v_sum", "v_max", "v_mean", "count"]
    assert out["k"].dtype == np.int64 and out["v_mean"].dtype == np.float64 and out["count"].dtype == np.int64


def test_chained_operators_share_a_process_unless_told_not_to():
    """map, filter, process and sinks after a forward edge of equal parallelism run in their
    upstream's process; chain=False, a key or another parallelism start a process of their own."""
    p = Pipeline()
    (p.from_arrays("src", {"k": np.arange(10), "v": np.ones(10)}, parallelism=2)
      .map("m", lambda b: b).filter("f", lambda b: b["k"] < 8)
      .map("own", lambda b: b, chain=False).map("after_own", lambda b: b)
      .map("wider", lambda b: b, parallelism=3)
      .key_by("k").aggregate("agg", {"v": "sum"}, parallelism=2).map("tail", lambda b: b)
      .collect("out"))
    result = p.run()
    assert result.processes() == {"src": ["src", "m", "f"], "own": ["own", "after_own"], "wider": ["wider"],
                                  "agg": ["agg", "tail", "out"]}
    assert sorted(result["out"]["k"].tolist()) == list(range(8)) and result["out"]["v_sum"].tolist() == [1.0] * 8
    tasks = {s.task for s in result.operators}
    assert len(tasks) == 2 + 2 + 3 + 2  # a process per task: src, own, wider, agg (with tail and out)


_EMITTED: dict[str, np.ndarray] = {}  # in each worker: the column its "double" map emitted last


@pytest.mark.parametrize("chain", [True, False])
def test_a_chained_operator_gets_its_upstreams_batch_without_a_copy(chain):
    """Chained, a batch goes on by a function call: the next operator reads the memory its
    upstream emitted (a read-only view of it). In a process of its own it reads a ring's copy."""
    def double(batch):
        _EMITTED["x"] = batch["x"] * 2
        return {"x": _EMITTED["x"]}

    def same_memory(batch):
        return {"shared": np.array([np.shares_memory(batch["x"], _EMITTED.get("x", np.zeros(0)))])}

    p = Pipeline()
    (p.from_arrays("src", {"x": np.arange(1000)}, batch_size=100).map("double", double)
      .map("check", same_memory, chain=chain).collect("out"))
    assert p.run()["out"]["shared"].tolist() == [chain] * 10


def test_a_chained_pipeline_gives_the_rows_and_statistics_of_an_unchained_one():
    """The same job with its operators chained into the sources' processes (the default) and
    each in a process of its own: the same rows and, per operator instance, the same counts of
    rows and batches in and out."""
    keys, values = np.arange(1000) % 7, np.arange(1000.0)
    parts = [[{"k": keys[lo : lo + 64], "v": values[lo : lo + 64]} for lo in range(start, 1000, 128)]
             for start in (0, 64)]  # instance i: every other 64 rows, each instance its own

    def run(chain):
        p = Pipeline()
        (p.source("src", lambda: TestingSource(*parts), parallelism=2)
          .map("double", lambda b: {"k": b["k"], "v": b["v"] * 2}, chain=chain)
          .filter("odd_keys", lambda b: b["k"] % 2 == 1, chain=chain)
          .flat_map("halves", lambda b: [b.slice(0, b.num_rows // 2), b.slice(b.num_rows // 2, b.num_rows)],
                    chain=chain)
          .collect("out", chain=chain))
        return p.run()

    chained, unchained = run(True), run(False)
    assert chained.processes() == {"src": ["src", "double", "odd_keys", "halves", "out"]}
    assert len(unchained.processes()) == 5
    want = sorted((int(k), 2 * v) for k, v in zip(keys, values) if k % 2 == 1)
    for result in (chained, unchained):
        assert sorted(zip(result["out"]["k"].tolist(), result["out"]["v"].tolist())) == want

    def counts(result):
        return {(s.name, s.instance): (s.records_in, s.records_out, s.batches_in, s.batches_out, s.dropped)
                for s in result.operators}
    assert counts(chained) == counts(unchained)
    assert counts(chained)[("halves", 0)][2:4] == (8, 16)  # instance 0's 8 batches, halved


@pytest.mark.parametrize("chain", [True, False])
def test_an_operator_changing_its_input_in_place_fails_chained_or_not(chain):
    """Input is read-only, through a ring or chained: a map that doubles its input in place
    fails, and the other reader of the same output (collect) sees the source's rows."""
    def double_in_place(batch):
        batch["x"][:] *= 2
        return batch

    p = Pipeline()
    src = p.from_arrays("src", {"x": np.arange(10)})
    src.map("double", double_in_place, chain=chain).collect("doubled")
    src.collect("raw")
    with pytest.raises(OperatorError, match="operator 'double' instance 0 failed: ValueError: .*read-only"):
        p.run()


def test_a_source_generators_batches_are_sent_as_they_are_made():
    """A source whose poll yields the same buffer refilled: each batch goes on before the next
    is made (as an operator's output does)."""
    class Refilling(Source):
        def open(self, ctx):
            super().open(ctx)
            self.done = False

        def poll(self):
            if self.done:
                raise StopIteration
            self.done = True
            return self.refill()

        def refill(self):
            buffer = np.zeros(5, np.int64)
            for i in range(3):
                buffer[:] = np.arange(5) + 5 * i
                yield {"x": buffer}

    p = Pipeline()
    p.source("src", Refilling).collect("out")
    assert sorted(p.run()["out"]["x"].tolist()) == list(range(15))


WORKER_IMPORTS = """
import sys
import numpy as np
from mpstream import Pipeline
from mpstream.operators import Operator

class ModulesImported(Operator):
    def open(self, ctx):
        super().open(ctx)
        self.before = set(sys.modules)

    def process(self, batch):
        return None

    def close(self):
        return {"module": np.array(sorted(set(sys.modules) - self.before) or ["-"])}

def rows(instance, offset):  # made in the workers: the coordinator never builds a batch
    return {"k": np.array(list("abcabc")), "v": np.arange(6.0)} if offset == 0 else None

p = Pipeline()
(p.from_generator("src", rows, parallelism=2)
  .key_by("k").aggregate("agg", {"v": ["sum", "mean"], "*": "count"}, salt=2, parallelism=2)
  .process("imports", ModulesImported).collect("out"))
print(sorted(set(p.run()["out"]["module"].to_numpy().tolist())))
"""


def test_workers_import_nothing_on_their_first_batches():
    """What a worker imports lazily, each worker pays for again (a fork does not share it):
    numpy.ma on the first batch cost every process 11-20 ms. In a fresh interpreter, the
    aggregation's task (string keys, combiners, a mean) imports nothing once running."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", WORKER_IMPORTS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['-']"
