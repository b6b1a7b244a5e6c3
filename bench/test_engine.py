"""pytest-benchmark suite for the engine (run: python -m pytest bench/).

Each mpstream figure has its baseline in the same process: keyed aggregation against numpy's
bincount over the same events, and the CPU-heavy map at parallelism 2 against parallelism 1.
"""

import pytest
from keyed_agg import cpu_map, events, run_mpstream, run_numpy

N = 2_000_000


@pytest.fixture(scope="module", params=["uniform", "hot"])
def data(request):
    return request.param, events(N, request.param)


@pytest.mark.parametrize("impl", ["numpy", "mpstream_hash", "mpstream_salted"])
def test_keyed_aggregation(benchmark, data, impl):
    dist, (keys, values) = data
    run = {"numpy": lambda: run_numpy(keys, values),
           "mpstream_hash": lambda: run_mpstream(keys, values, 0),
           "mpstream_salted": lambda: run_mpstream(keys, values, 8)}[impl]
    out = benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["events_per_s"] = N / benchmark.stats.stats.min
    assert int(out[1].sum()) == N


@pytest.mark.parametrize("parallelism", [1, 2])
def test_cpu_heavy_map(benchmark, parallelism):
    benchmark.pedantic(cpu_map, args=(50_000, parallelism), rounds=3)
