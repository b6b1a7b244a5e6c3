"""pytest-benchmark suite for start-up (run: python -m pytest bench/): start-to-result of 10
rows through small jobs, chained and not, against multiprocessing.Pool(2) started and mapped
over the same rows and against one bare fork, in the same process (see startup.py)."""

import pytest
from startup import JOBS, mp_pool, mpstream_job, os_fork


@pytest.mark.parametrize("name, operators, parallelism, chain", JOBS, ids=[job[0] for job in JOBS])
def test_start_to_result(benchmark, name, operators, parallelism, chain):
    rows = benchmark(mpstream_job(operators, parallelism, chain))
    assert rows == [x * 2 ** max(0, operators - 2) for x in range(10)]


def test_mp_pool_start_and_map(benchmark):
    assert benchmark(mp_pool) == [2 * x for x in range(10)]


def test_one_bare_fork(benchmark):
    assert benchmark(os_fork) == [2 * x for x in range(10)]
