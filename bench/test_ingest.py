"""pytest-benchmark suite for ingestion (run: python -m pytest bench/): files read, filtered,
aggregated by a string key and written to Parquet by mpstream (parallelism 2), DuckDB and
polars, in the same process, each result checked against numpy before it is timed (see
ingest.py; needs the bench extra)."""

import pytest

pytest.importorskip("duckdb", reason="the ingest benchmark needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("polars", reason="the ingest benchmark needs the bench extra: pip install -e '.[bench]'")

from ingest import engines, generate, reference, timed  # noqa: E402

ROWS = 1_000_000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = generate(ROWS, str(tmp_path_factory.mktemp("ingest")))
    return data, reference(data), engines(data)


@pytest.mark.parametrize("job", ["csv mpstream", "csv mpstream_p1", "csv duckdb", "csv polars",
                                 "parquet mpstream", "parquet duckdb", "parquet polars"])
def test_ingest(benchmark, data, job, tmp_path):
    rows, want, jobs = data
    benchmark.pedantic(timed, args=(jobs[job], str(tmp_path), job, want), rounds=3)
    benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.min
