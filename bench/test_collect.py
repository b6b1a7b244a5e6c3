"""pytest-benchmark suite for collecting a job's rows (run: python -m pytest bench/): 2M rows
(32 MB) returned to the caller at parallelism 1 and 2, against one process copying them, the
same rows as a datetime64 and a nullable column, and in 512-row batches, collected against
dropped by the sink (see collect.py)."""

import pytest
from collect import SMALL_BATCH, check, collect_job, columns, typed_columns

DATA = columns(2_000_000)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_collect(benchmark, parallelism):
    check(benchmark(collect_job(DATA, parallelism)), DATA)


def test_collect_datetime_and_nullable_columns(benchmark):
    typed = typed_columns(len(DATA["x"]))
    check(benchmark(collect_job(typed, 1)), typed)


def test_np_copy(benchmark):
    out = benchmark(lambda: {name: col.copy() for name, col in DATA.items()})
    check(out, DATA)


def test_collect_small_batches(benchmark):
    check(benchmark(collect_job(DATA, 1, SMALL_BATCH)), DATA)


def test_drop_small_batches(benchmark):
    assert benchmark(collect_job(DATA, 1, SMALL_BATCH, collect=False)) is None
