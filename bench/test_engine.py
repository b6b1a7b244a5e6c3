"""pytest-benchmark suite for the engine (run: python -m pytest bench/), through mpstream's
pytest plugin (the ``mpstream_benchmark`` fixture: a fresh pipeline per round, the job's
figures in ``extra_info``).

Each mpstream figure has its baseline in the same process: keyed aggregation (and the keyed
edge alone) against numpy's bincount over the same events, and the CPU-heavy map at
parallelism 2 against parallelism 1.
"""

import numpy as np
import pytest
from keyed_agg import check_shuffled, cpu_map_job, events, mpstream_job, mpstream_sums, run_numpy, shuffle_job

N = 2_000_000


@pytest.fixture(scope="module", params=["uniform", "hot"])
def data(request):
    return request.param, events(N, request.param)


def test_keyed_aggregation_numpy(benchmark, data):
    dist, (keys, values) = data
    out = benchmark(run_numpy, keys, values)
    if benchmark.stats:  # None with --benchmark-disable
        benchmark.extra_info["events_per_s"] = N / benchmark.stats.stats.min
    assert int(out[1].sum()) == N


@pytest.mark.parametrize("salt", [0, 8], ids=["mpstream_hash", "mpstream_salted"])
def test_keyed_aggregation_mpstream(mpstream_benchmark, data, salt):
    dist, (keys, values) = data
    sums, counts, _ = mpstream_sums(mpstream_benchmark(lambda: mpstream_job(keys, values, salt)))
    assert np.array_equal(counts, np.bincount(keys, minlength=len(counts)))


def test_keyed_edge_alone(mpstream_benchmark, data):
    """source -> key_by -> a sink that drops the rows: the shuffle without the aggregation."""
    dist, (keys, values) = data
    check_shuffled(mpstream_benchmark(lambda: shuffle_job(keys, values)), N)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_cpu_heavy_map(mpstream_benchmark, parallelism):
    result = mpstream_benchmark(lambda: cpu_map_job(50_000, parallelism))
    assert result.per_operator()["parse"]["records_in"] == 50_000
