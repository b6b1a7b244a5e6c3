"""pytest-benchmark suite for collecting a job's rows (run: python -m pytest bench/): 2M rows
(32 MB) returned to the caller at parallelism 1 and 2, against one process copying them
(see collect.py)."""

import pytest
from collect import check, collect_job, columns

DATA = columns(2_000_000)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_collect(benchmark, parallelism):
    check(benchmark(collect_job(DATA, parallelism)), DATA)


def test_np_copy(benchmark):
    out = benchmark(lambda: {name: col.copy() for name, col in DATA.items()})
    check(out, DATA)
