"""pytest-benchmark suite for ingestion (run: python -m pytest bench/): files read, filtered,
aggregated by a string key and written to Parquet by mpstream (parallelism 2, through the
``mpstream_benchmark`` fixture of mpstream's pytest plugin), DuckDB and polars, in the same
process, each result checked against numpy (see ingest.py; needs the bench extra)."""

import pytest

pytest.importorskip("duckdb", reason="the ingest benchmark needs the bench extra: pip install -e '.[bench]'")
pytest.importorskip("polars", reason="the ingest benchmark needs the bench extra: pip install -e '.[bench]'")

from ingest import check, engines, generate, ingest_job, read_result, reference, timed  # noqa: E402

ROWS = 1_000_000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = generate(ROWS, str(tmp_path_factory.mktemp("ingest")))
    return data, reference(data), engines(data)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("parallelism", [1, 2])
def test_ingest_mpstream(mpstream_benchmark, data, fmt, parallelism, tmp_path):
    rows, want, _ = data
    outs = []

    def job():
        outs.append(str(tmp_path / f"round-{len(outs)}"))
        return ingest_job(fmt, rows.csv if fmt == "csv" else rows.parquet, outs[-1], parallelism)

    mpstream_benchmark(job)
    check("mpstream", read_result(outs[-1]), want)


@pytest.mark.parametrize("job", ["csv duckdb", "csv polars", "parquet duckdb", "parquet polars"])
def test_ingest_contenders(benchmark, data, job, tmp_path):
    rows, want, jobs = data
    benchmark.pedantic(timed, args=(jobs[job], str(tmp_path), job, want), rounds=3)
    if benchmark.stats:  # None with --benchmark-disable
        benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.min
