"""A plan is checked when it is built: bad arguments raise ValueError / TypeError naming the
operator and the argument, before any process starts."""

import numpy as np
import pytest

from mpstream import Batch
from mpstream.pipeline import Pipeline


def keyed():
    return Pipeline().from_arrays("src", {"k": np.arange(4), "v": np.ones(4)}).key_by("k")


@pytest.mark.parametrize("spec, message", [
    ({"v": "median"}, "operator 'agg'.*unknown aggregate 'median' for column 'v'"),
    ({"*": "sum"}, "operator 'agg'.*'\\*' takes only count"),
    ({}, "operator 'agg'.*at least one"),
    ({"v": []}, "operator 'agg'.*at least one"),
])
def test_bad_aggregation_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        keyed().aggregate("agg", spec)


@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "process"])
@pytest.mark.parametrize("parallelism", [0, -1])
def test_parallelism_below_one_is_refused(method, parallelism):
    stream = Pipeline().from_arrays("src", {"v": np.ones(4)})
    with pytest.raises(ValueError, match=f"operator 'op': parallelism must be an int >= 1, got {parallelism}"):
        getattr(stream, method)("op", lambda b: b, parallelism=parallelism)


@pytest.mark.parametrize("parallelism", [0, 1.5, "2"])
def test_aggregate_parallelism_is_checked(parallelism):
    with pytest.raises((ValueError, TypeError), match="operator 'agg': parallelism must be an int >= 1"):
        keyed().aggregate("agg", {"v": "sum"}, parallelism=parallelism)


@pytest.mark.parametrize("salt", [-1, 2.5, "4", True])
def test_salt_must_be_an_int_of_at_least_zero(salt):
    with pytest.raises((ValueError, TypeError), match="operator 'agg': salt must be an int >= 0"):
        keyed().aggregate("agg", {"v": "sum"}, salt=salt)


def test_range_bounds_are_checked_against_the_next_operators_parallelism():
    stream = Pipeline().from_arrays("src", {"k": np.arange(4)})
    with pytest.raises(ValueError, match="range bounds for key 'k' must be sorted"):
        stream.key_by("k", "range", bounds=[5, 1])
    with pytest.raises(ValueError, match="operator 'm'.*3 instances needs 2 range bounds, got 1"):
        stream.key_by("k", "range", bounds=[5]).map("m", lambda b: b, parallelism=3)


@pytest.mark.parametrize("name", ["", "a/b", "nul\0", ".", "..", 3])
def test_operator_names_must_be_usable_as_file_names(name):
    with pytest.raises((ValueError, TypeError), match="operator name"):
        Pipeline().from_arrays(name, {"v": np.ones(2)})


def test_a_missing_key_column_is_named_with_the_columns_that_exist():
    from mpstream import OperatorError

    p = Pipeline()
    p.from_arrays("src", {"k": np.arange(4), "v": np.ones(4)}).key_by("nokey").aggregate("agg", {"v": "sum"}).collect("out")
    with pytest.raises(OperatorError, match=r"key column 'nokey' is not in the batch \(columns: \['k', 'v'\]\)"):
        p.run()


def test_a_generator_that_returns_a_list_says_what_it_should_return():
    from mpstream import OperatorError

    p = Pipeline()
    p.from_generator("gen", lambda i, o: [1, 2, 3]).collect("out")
    with pytest.raises(OperatorError, match="operator 'gen'.*returned list.*Batch, a mapping of columns"):
        p.run()


def test_from_batches_takes_mappings_and_names_anything_else():
    p = Pipeline()
    p.from_batches("src", [{"v": np.arange(3)}, Batch({"v": np.arange(3, 5)})]).collect("out")
    assert p.run()["out"]["v"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match=r"operator 'bad': batch 1 is a list"):
        Pipeline().from_batches("bad", [{"v": np.arange(3)}, [1, 2]])
