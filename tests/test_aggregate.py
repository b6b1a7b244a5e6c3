"""KeyedAggregate against a plain numpy/Python reference; partials merge exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpstream import Batch, StringColumn
from mpstream.aggregate import DIRECT_KEYS, AggregateError, Combiner, KeyedAggregate, KeyIndex
from mpstream.operators import Aggregate, Context
from mpstream.partition import HashPartitioner, split

WORDS = np.array(["", "a", "ß", "hot.example.com", "x.org"])
SPEC = {"v": ["sum", "min", "max", "mean"], "n": ["sum", "max"], "*": "count"}


def reference(keys, v, n):
    out = {}
    for k, a, b in zip(keys, v, n):
        e = out.setdefault(k, {"v": [], "n": []})
        e["v"].append(a)
        e["n"].append(b)
    return {k: (sum(e["v"]), min(e["v"]), max(e["v"]), sum(e["v"]) / len(e["v"]), sum(e["n"]), max(e["n"]), len(e["v"]))
            for k, e in out.items()}


def as_table(result, key):
    col = result[key]
    keys = col.to_numpy().tolist() if not isinstance(col, np.ndarray) else col.tolist()
    return {k: tuple(result[c][i] for c in ("v_sum", "v_min", "v_max", "v_mean", "n_sum", "n_max", "count"))
            for i, k in enumerate(keys)}


def assert_tables_equal(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k][:4], want[k][:4], rtol=1e-12, atol=1e-12)  # float sums: order differs
        assert got[k][4:] == want[k][4:]  # integer sums, max, counts: exact


batches_strategy = st.lists(st.integers(0, 300), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=batches_strategy, string_keys=st.booleans(),
       parallelism=st.sampled_from([1, 2, 4]), salt=st.sampled_from([0, 4]))
def test_two_stage_aggregation_matches_reference(seed, sizes, string_keys, parallelism, salt):
    rng = np.random.default_rng(seed)
    batches = []
    for rows in sizes:
        keys = WORDS[rng.integers(0, len(WORDS), rows)] if string_keys else rng.integers(-5, 30, rows)
        batches.append(Batch({"k": keys, "v": rng.standard_normal(rows), "n": rng.integers(-2**40, 2**40, rows)}))
    # stage 1: rows partitioned (salted or not) over `parallelism` partial aggregates
    partials = [KeyedAggregate("k", SPEC) for _ in range(parallelism)]
    partitioner = HashPartitioner("k", salt)
    for b in batches:
        for agg, part in zip(partials, split(b, partitioner.assign(b, parallelism), parallelism)):
            if part is not None:
                agg.update(part)
    # stage 2: partials by key into final aggregates
    finals = [KeyedAggregate("k", SPEC) for _ in range(parallelism)]
    for agg in partials:
        p = agg.partial()
        for final, part in zip(finals, split(p, HashPartitioner("k").assign(p, parallelism), parallelism)):
            if part is not None:
                final.merge(part)
    got = {}
    for final in finals:
        if len(final):
            got.update(as_table(final.result(), "k"))
    all_rows = Batch.concat(batches)
    keys = all_rows["k"].to_numpy().tolist() if string_keys else all_rows["k"].tolist()
    assert_tables_equal(got, reference(keys, all_rows["v"].tolist(), all_rows["n"].tolist()))


def test_many_keys_grow_the_map_and_accumulators():
    agg = KeyedAggregate("k", {"v": "sum", "*": "count"})
    keys = np.arange(50_000) * 7919 % 100_003
    for chunk in np.array_split(keys, 7):
        agg.update(Batch({"k": chunk, "v": np.ones(len(chunk))}))
    r = agg.result()
    assert len(r["k"]) == len(np.unique(keys))
    assert r["v_sum"].sum() == 50_000 and (r["count"] == 1).all()


def sums_and_counts(keys, values):
    """{key: (sum, count)} by numpy: the reference for int keys of any range."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return dict(zip(uniq.tolist(), zip(np.bincount(inverse, weights=values).tolist(), np.bincount(inverse).tolist())))


@pytest.mark.parametrize("seed", range(3))
def test_small_large_and_negative_keys_with_runs_and_clear(seed):
    """Small keys live in the key map's direct-address front (which grows with the key count,
    taking keys over from the hash table), the rest in the table, hot runs go through the
    run-summing kernels: all must agree with numpy, also after clear() reuses the memory."""
    rng = np.random.default_rng(seed)
    agg = KeyedAggregate("k", {"v": "sum", "*": "count"})
    for size in ("many", "few", "many"):  # clear() empties big and nearly empty maps its own ways
        batches = [
            np.repeat(rng.integers(0, 50, 40), rng.integers(1, 30, 40)),  # hot runs of small keys
            rng.integers(0, 200_000, 30_000),  # more keys: the front grows past its first limit
            np.concatenate([rng.integers(-(2**62), -1, 500), rng.integers(2**40, 2**40 + 50, 500),
                            rng.integers(0, 1 << 20, 1000), np.array([0, 2**63 - 1, -(2**63)])]),
        ] if size == "many" else [np.array([5, 5, 2**40, -1, 5])]
        values = [rng.integers(-1000, 1000, len(k)).astype(np.float64) for k in batches]
        for k, v in zip(batches, values):
            agg.update(Batch({"k": k, "v": v}))
        r = agg.result()
        got = {k: (s, c) for k, s, c in zip(r["k"].tolist(), r["v_sum"].tolist(), r["count"].tolist())}
        assert got == sums_and_counts(np.concatenate(batches), np.concatenate(values))  # small ints: exact
        agg.clear()
        assert len(agg) == 0 and len(agg.result()["k"]) == 0


@pytest.mark.parametrize("seed", range(4))
def test_slots_follow_first_appearance_across_small_and_large_keys(seed):
    """Small keys go to the key map's direct front at once, large ones wait in blocks of 16 for
    the hash table; a new key's slot is still its rank among the keys in order of first
    appearance (the reference: numpy's first index of every distinct key), across batches and
    while the front grows."""
    rng = np.random.default_rng(seed)
    index, seen = KeyIndex("k"), []
    for rows in (1, 40, 3000, 700):
        keys = np.where(rng.random(rows) < 0.5, rng.integers(0, 3 * rows, rows),
                        rng.integers(2**40, 2**40 + rows, rows)).astype(np.int64)
        slots = index.slots(keys)
        seen.append(keys)
        every = np.concatenate(seen)
        _, first = np.unique(every, return_index=True)
        rank = {int(k): r for r, k in enumerate(every[np.sort(first)])}
        assert slots.tolist() == [rank[int(k)] for k in keys]
    assert index.keys().tolist() == every[np.sort(first)].tolist()


def test_combiner_hands_on_partials_at_its_bounds_and_on_flush():
    spec = {"v": ["sum", "max"], "*": "count"}
    batch = Batch({"k": np.array([3, 1, 3, 2, 1, 3]), "v": np.arange(6.0)})
    by_keys = Combiner("k", spec, max_delay_s=3600, max_keys=3)
    assert by_keys.due is None and by_keys.flush() is None
    assert by_keys.add(batch.slice(0, 3)) is None and by_keys.due is not None  # keys 3, 1: under the bound
    p = by_keys.add(batch.slice(3, 6))  # key 2 makes three
    assert p["k"].tolist() == [3, 1, 2] and p["v.sum"].tolist() == [7.0, 5.0, 3.0]
    assert p["v.max"].tolist() == [5.0, 4.0, 3.0] and p["count"].tolist() == [3, 2, 1]
    assert by_keys.due is None and by_keys.flush() is None
    assert by_keys.add(batch.slice(0, 0)) is None and by_keys.due is None  # no rows: nothing held
    at_once = Combiner("k", spec, max_delay_s=0)  # latency bound 0: every batch goes on
    assert at_once.add(batch.slice(0, 2))["k"].tolist() == [1, 3]  # small int keys: in key order
    assert at_once.add(batch.slice(2, 3))["k"].tolist() == [3]  # the previous keys are gone
    merged = KeyedAggregate("k", spec)  # partials merge into what the raw rows give
    held = Combiner("k", spec, max_delay_s=3600)
    held.add(batch.slice(0, 4))
    held.add(batch.slice(4, 6))
    merged.merge(held.flush())
    r = merged.result()
    assert r["k"].tolist() == [1, 2, 3] and r["v_sum"].tolist() == [5.0, 3.0, 7.0] and r["count"].tolist() == [2, 1, 3]
    at_bound = Combiner("k", spec, max_delay_s=3600, max_keys=4)  # keys by value: the bound counts keys, not cells
    assert at_bound.add(Batch({"k": np.array([0, 3, 3]), "v": np.ones(3)})) is None  # 2 keys in 4 cells
    assert at_bound.add(Batch({"k": np.array([1, 2]), "v": np.ones(2)}))["count"].tolist() == [1, 1, 1, 2]


@pytest.mark.parametrize("base", [0, 2**40], ids=["keys_by_value", "key_map"])
def test_a_combiners_last_flush_hands_on_its_partials_and_takes_no_more_rows(base):
    spec = {"v": ["sum", "max"], "*": "count"}
    batch = Batch({"k": base + np.array([3, 1, 3, 2, 1, 3]), "v": np.arange(6.0)})
    copied, lent = Combiner("k", spec, max_delay_s=3600), Combiner("k", spec, max_delay_s=3600)
    for c in (copied, lent):
        c.add(batch.slice(0, 4))
        c.add(batch.slice(4, 6))
    want, got = copied.flush(), lent.flush(last=True)  # the key map lends its accumulators themselves
    assert {n: got[n].tolist() for n in got} == {n: want[n].tolist() for n in want}
    assert lent.flush(last=True) is None  # nothing held since
    with pytest.raises(RuntimeError, match="takes no more rows"):
        lent.add(batch)
    assert dict(zip((got["k"] - base).tolist(), got["v.sum"].tolist())) == {3: 7.0, 1: 5.0, 2: 3.0}  # untouched


def combiner_reference(keys, values):
    """key -> (sum, min, max, count) of the values: :func:`reference`'s, in plain Python."""
    return {k: (s, lo, hi, n) for k, (s, lo, hi, _, _, _, n) in reference(keys.tolist(), values.tolist(),
                                                                           values.tolist()).items()}


def combiner_table(p):
    return {k: (s, lo, hi, n) for k, s, lo, hi, n in zip(p["k"].tolist(), p["v.sum"].tolist(), p["v.min"].tolist(),
                                                         p["v.max"].tolist(), p["count"].tolist())}


@pytest.mark.parametrize("dtype, stray", [(np.int64, DIRECT_KEYS), (np.int64, -1), (np.int32, 2**31 - 1),
                                          (np.uint64, 2**63 + 5), (np.uint8, None)])
def test_a_combiner_folds_small_int_keys_by_value_and_moves_to_its_key_map_for_other_keys(dtype, stray):
    spec = {"v": ["sum", "min", "max"], "*": "count"}
    rng = np.random.default_rng(7)
    batches = [Batch({"k": rng.integers(0, 200, rows).astype(dtype), "v": rng.integers(-50, 50, rows)})
               for rows in (0, 300, 1, 500)]
    c = Combiner("k", spec, max_delay_s=3600)
    for b in batches:
        assert c.add(b) is None
    p = c.flush()
    assert p["k"].dtype == dtype and p["k"].tolist() == sorted(p["k"].tolist())  # by value: in key order
    every = Batch.concat(batches)
    assert combiner_table(p) == combiner_reference(every["k"], every["v"])
    if stray is None:
        return
    later = [batches[3], Batch({"k": np.array([5, stray, 5], dtype), "v": np.array([1, 2, 3])}), batches[1]]
    for b in later:  # the stray key moves the held rows to the key map; the rows after it go there too
        assert c.add(b) is None
    every = Batch.concat(later)
    assert combiner_table(c.flush()) == combiner_reference(every["k"], every["v"])
    assert c.add(batches[2]) is None and combiner_table(c.flush()) == combiner_reference(batches[2]["k"], batches[2]["v"])


def test_a_combiner_moving_to_its_key_map_keeps_nulls_widening_and_its_columns():
    spec = {"v": ["sum", "count"], "*": "count"}
    ints = Batch({"k": np.array([1, 2, 1]), "v": np.ma.MaskedArray([1, 2, 3], mask=[False, True, False])})
    floats = Batch({"k": np.array([2, -4, 1]), "v": np.array([0.5, 1.5, 2.5])})  # -4 moves it to the key map
    by_value = Combiner("k", spec, max_delay_s=3600)
    by_value.add(ints)
    before = by_value.flush()
    c = Combiner("k", spec, max_delay_s=3600)
    c.add(ints)
    c.add(floats)
    after = c.flush()
    assert list(after) == list(before)  # the same columns in the same order (v.sum widened to float64)
    table = {k: (n, s, nulls) for k, n, s, nulls in zip(after["k"].tolist(), after["count"].tolist(),
                                                        after["v.sum"].tolist(), after["v.nulls"].tolist())}
    assert table == {1: (3, 6.5, 0), 2: (2, 0.5, 1), -4: (1, 1.5, 0)} and after["v.sum"].dtype == np.float64


def test_a_combiner_keeps_its_checks_and_schema_when_it_folds_keys_by_value():
    c = Combiner("k", {"v": "sum", "*": "count"}, max_delay_s=3600)
    assert c.empty() is None
    assert c.add(Batch({"k": np.zeros(0, np.int16), "v": np.zeros(0, np.float32)})) is None
    empty = c.empty()
    assert empty["k"].dtype == np.int16 and empty["v.sum"].dtype == np.float64 and empty.num_rows == 0
    c.add(Batch({"k": np.array([2, 1], np.int16), "v": np.array([0.5, 1.5], np.float32)}))
    with pytest.raises(AggregateError, match="key column 'k' changed type from <i2 to <i8"):
        c.add(Batch({"k": np.array([1]), "v": np.array([1.0])}))
    with pytest.raises(AggregateError, match="aggregated column 'v' is not in the batch"):
        Combiner("k", {"v": "sum"}).add(Batch({"k": np.arange(2)}))
    refused = Combiner("k", {"v": "sum"})
    with pytest.raises(AggregateError, match="column 'v' has dtype str"):  # the key's type is fixed all the same
        refused.add(Batch({"k": np.array([1], np.int16), "v": StringColumn.from_strings(["x"])}))
    with pytest.raises(AggregateError, match="key column 'k' changed type from <i2 to <u8"):
        refused.add(Batch({"k": np.array([1], np.uint64), "v": np.ones(1)}))
    with pytest.raises(AggregateError, match="key column 'k' has dtype float64"):
        Combiner("k", {"v": "sum"}).add(Batch({"k": np.ones(2), "v": np.ones(2)}))


def test_bad_specs_and_columns_are_named():
    with pytest.raises(AggregateError, match="unknown aggregate 'median' for column 'v'"):
        KeyedAggregate("k", {"v": "median"})
    agg = KeyedAggregate("k", {"v": "sum"})
    with pytest.raises(AggregateError, match="aggregated column 'v' is not in the batch"):
        agg.update(Batch({"k": np.arange(2)}))
    with pytest.raises(AggregateError, match="key column 'k' has dtype float64"):
        agg.update(Batch({"k": np.ones(2), "v": np.ones(2)}))


def test_extreme_values_nan_and_unsigned_sums():
    agg = KeyedAggregate("k", {"f": ["min", "max", "sum"], "u": ["sum", "max"], "i": ["min", "max"]})
    big = np.uint64(2**63 + 5)
    agg.update(Batch({"k": np.array([1, 1, 2]), "f": np.array([1.0, np.nan, -np.inf]),
                      "u": np.array([big, 1, 3], np.uint64), "i": np.array([-2**63, 2**63 - 1, 7])}))
    r = agg.result()
    assert np.isnan(r["f_min"][0]) and np.isnan(r["f_max"][0]) and np.isnan(r["f_sum"][0])  # as numpy
    assert r["f_min"][1] == -np.inf
    assert r["u_sum"].dtype == np.uint64 and r["u_sum"].tolist() == [2**63 + 6, 3]
    assert r["u_max"].tolist() == [2**63 + 5, 3]
    assert r["i_min"].tolist() == [-2**63, 7] and r["i_max"].tolist() == [2**63 - 1, 7]


# ---- value columns whose dtype changes between batches ---------------------------------------

MIXED = [  # (k, v) batches whose v is int, then float, then int again; and unsigned
    {"k": np.array([1, 1, 2]), "v": np.array([1, 2, 7])},
    {"k": np.array([1, 2]), "v": np.array([0.5, -1.25])},
    {"k": np.array([2, 3]), "v": np.array([4, 5], np.int32)},
    {"k": np.array([3, 1]), "v": np.array([2**40, 3], np.uint64)},
]
ALL_FUNCS = {"v": ["sum", "min", "max", "mean", "count"], "*": "count"}


def numpy_reference(batches):
    """What numpy gives for the concatenated input: v widened to float64 (exact here)."""
    k = np.concatenate([b["k"] for b in batches])
    v = np.concatenate([np.asarray(b["v"], np.float64) for b in batches])
    return {int(key): (v[k == key].sum(), v[k == key].min(), v[k == key].max(), v[k == key].mean(),
                       int((k == key).sum())) for key in np.unique(k)}


def table_of(result):
    return {int(key): (s, lo, hi, m, c) for key, s, lo, hi, m, c in
            zip(*(result[c].tolist() for c in ("k", "v_sum", "v_min", "v_max", "v_mean", "count")))}


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0]])
def test_an_accumulator_widens_to_float64_when_a_column_changes_dtype(order):
    batches = [MIXED[i] for i in order]
    agg = KeyedAggregate("k", ALL_FUNCS)
    for b in batches:
        agg.update(Batch(b))
    result = agg.result()
    assert result["v_sum"].dtype == np.float64 and result["v_min"].dtype == np.float64
    assert table_of(result) == numpy_reference(batches)


def test_partials_of_different_dtypes_merge_exactly():
    """A partial stage that saw ints and one that saw floats, merged (the salted path and a
    restore both merge partials)."""
    ints, floats = KeyedAggregate("k", ALL_FUNCS), KeyedAggregate("k", ALL_FUNCS)
    ints.update(Batch(MIXED[0]))
    floats.update(Batch(MIXED[1]))
    for first, second in ((ints, floats), (floats, ints)):
        final = KeyedAggregate("k", ALL_FUNCS)
        final.merge(first.partial())
        final.merge(second.partial())
        assert table_of(final.result()) == numpy_reference(MIXED[:2])


def test_a_number_column_that_becomes_a_string_is_an_error_naming_it():
    agg = KeyedAggregate("k", {"v": "sum"})
    agg.update(Batch({"k": np.array([1]), "v": np.array([1.5])}))
    with pytest.raises(AggregateError, match="column 'v'.*str"):
        agg.update(Batch({"k": np.array([1]), "v": np.array(["x"])}))


def test_snapshots_copy_into_the_arrays_of_committed_checkpoints_and_never_into_lent_ones():
    """An aggregate lends its snapshot's arrays to the checkpoint writer until the checkpoint
    commits: a snapshot taken meanwhile gets fresh arrays and the lent one keeps its values;
    after the commit the next snapshot copies into the committed one's arrays."""
    op = Aggregate("k", {"v": "sum", "*": "count"})
    op.open(Context("agg", 0, 1, checkpointing=True))
    keys = np.arange(10_000) % 1000

    def snapshot_after_rows(checkpoint_id):
        op.process(Batch({"k": keys, "v": np.ones(len(keys))}))
        op.prepare_snapshot_pre_barrier(checkpoint_id)
        return op.snapshot()

    first = snapshot_after_rows(1)
    second = snapshot_after_rows(2)  # checkpoint 1 not committed yet: its arrays are lent
    assert not np.shares_memory(first["count"], second["count"])
    np.testing.assert_array_equal(first["count"], np.full(1000, 10))  # not overwritten
    np.testing.assert_array_equal(second["count"], np.full(1000, 20))
    op.notify_checkpoint_complete(2)  # and 1 before it: both written
    third = snapshot_after_rows(3)
    assert np.shares_memory(third["count"], second["count"]) and np.shares_memory(third["v.sum"], second["v.sum"])
    np.testing.assert_array_equal(third["count"], np.full(1000, 30))
    np.testing.assert_array_equal(third["v.sum"], np.full(1000, 30.0))
    fourth = snapshot_after_rows(4)  # 3 is lent
    assert not np.shares_memory(fourth["count"], third["count"]) and not np.shares_memory(fourth["count"], first["count"])
    np.testing.assert_array_equal(third["count"], np.full(1000, 30))
    np.testing.assert_array_equal(np.sort(fourth["k"]), np.arange(1000))
    op.notify_checkpoint_complete(3)  # 4's arrays are lent still (3's were let go at 4)
    fifth = snapshot_after_rows(5)
    assert not np.shares_memory(fifth["count"], fourth["count"]) and not np.shares_memory(fifth["count"], third["count"])
    np.testing.assert_array_equal(fourth["count"], np.full(1000, 40))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_keys_are_fetched_as_they_come_and_keys_handed_out_never_change(dtype):
    """KeyIndex.keys() appends only the new keys to what it fetched before (slots are only
    ever appended); keys handed out before (a snapshot being written) keep their values, also
    across a clear()."""
    index = KeyIndex("k")
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 60_000, 5_000).astype(dtype) for _ in range(4)]
    seen, known, handed_out = [], set(), []
    for keys in batches:
        index.slots(keys)
        for k in keys.tolist():
            if k not in known:
                known.add(k)
                seen.append(k)
        got = index.keys()
        assert got.dtype == dtype and not got.flags.writeable
        if dtype == np.int64:  # a view of the fetched keys: nobody may make it writeable again
            with pytest.raises(ValueError):
                got.flags.writeable = True
        np.testing.assert_array_equal(got, np.array(seen, dtype))  # slot order: first appearance
        handed_out.append((got, got.copy()))
    index.clear()
    index.slots(np.arange(50_000, dtype=dtype)[::-1])
    np.testing.assert_array_equal(index.keys(), np.arange(50_000, dtype=dtype)[::-1])
    for got, then in handed_out:
        np.testing.assert_array_equal(got, then)
