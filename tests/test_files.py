"""File sources (Parquet, CSV, JSON lines, Arrow IPC): every format split over parallelism 1-3
against pyarrow's own reading of the same files, a snapshot and restore at every kind of
position, nulls, directories and globs, and bad files (each an error naming the file)."""

import json
import os

import numpy as np
import pytest
from conftest import die_once_checkpointed, die_once_units_are_checkpointed

from mpstream import OperatorError, Pipeline
from mpstream.batch import Batch, StringColumn
from mpstream.errors import RestoreError, SourceError
from mpstream.operators import Context, Operator

pa = pytest.importorskip("pyarrow", reason="file sources need pyarrow: pip install 'mpstream[arrow]'")
import pyarrow.csv  # noqa: E402
import pyarrow.feather  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from mpstream import files  # noqa: E402


@pytest.fixture(autouse=True)
def small_units(monkeypatch):
    """Units and blocks of a few KiB, so small files split into many (forked workers inherit it)."""
    monkeypatch.setattr(files, "UNIT", 2048)
    monkeypatch.setattr(files, "BLOCK", 1024)


def table(rows: int, seed: int) -> "pa.Table":
    rng = np.random.default_rng(seed)
    keys = np.array([f"key-{i}" for i in rng.integers(0, 50, rows)], dtype=object)
    keys[rng.random(rows) < 0.05] = None
    ints = rng.integers(-1000, 1000, rows)
    floats = np.round(rng.standard_normal(rows), 3)
    return pa.table({"key": pa.array(keys, pa.string()),
                     "n": pa.array(ints, mask=rng.random(rows) < 0.05),
                     "x": pa.array(floats, mask=rng.random(rows) < 0.05)})


def write(fmt: str, directory, parts: list["pa.Table"]) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, t in enumerate(parts):
        path = os.path.join(directory, f"part-{i}.{fmt}")
        if fmt == "parquet":
            pq.write_table(t, path, row_group_size=700)
        elif fmt == "csv":
            pa.csv.write_csv(t, path)
        elif fmt == "json":
            with open(path, "w") as f:
                for row in t.to_pylist():
                    f.write(json.dumps(row) + "\n")
        else:
            pa.feather.write_feather(t, path, chunksize=600, compression="uncompressed")
        paths.append(path)
    return paths


def rows_of(batch_or_table) -> list[tuple]:
    """Sorted rows as Python values (None for nulls)."""
    if isinstance(batch_or_table, Batch):
        batch_or_table = batch_or_table.to_arrow()
    columns = [batch_or_table.column(n).to_pylist() for n in ("key", "n", "x")]
    return sorted(zip(*columns), key=repr)


SOURCES = {"parquet": Pipeline.from_parquet, "csv": Pipeline.from_csv, "json": Pipeline.from_json,
           "arrow": Pipeline.from_arrow_ipc}


@pytest.mark.parametrize("parallelism", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "arrow"])
def test_each_format_split_over_instances_reads_every_row_once(tmp_path, fmt, parallelism):
    parts = [table(3000, 1), table(1200, 2), table(10, 3)]
    write(fmt, tmp_path / "data", parts)
    (tmp_path / "data" / "_SUCCESS").write_text("")  # skipped, as Spark's marker files are
    p = Pipeline()
    SOURCES[fmt](p, "src", str(tmp_path / "data"), parallelism=parallelism, batch_size=500).collect("out")
    result = p.run()
    out = result["out"]
    assert rows_of(out) == rows_of(pa.concat_tables(parts))
    done = [unit for s in result.operators if s.name == "src" for unit in s.position["done"]]
    units = len(open_source(fmt, tmp_path / "data").units.pool)
    assert sorted(done) == list(range(units)) and units > parallelism  # each unit read by one instance
    assert out.schema[0] == ("key", "utf8?")


def open_source(fmt, path, instance=0, parallelism=1, **options):
    source = files.FileSource(fmt, str(path), 300, **options)
    source.open(Context("src", instance, parallelism))
    return source


def drain(source) -> list[Batch]:
    out = []
    while True:
        try:
            out.append(source.poll().copy())
        except StopIteration:
            return out


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "arrow"])
def test_a_restore_at_any_position_replays_exactly(tmp_path, fmt):
    write(fmt, tmp_path, [table(2500, 4), table(900, 5)])
    whole = drain(open_source(fmt, tmp_path))
    units = len(open_source(fmt, tmp_path).units.pool)
    assert units > 2  # several row groups / record batches / byte ranges
    for stop in (1, 4, len(whole) // 2, len(whole) - 1):  # inside units and at their ends
        first = open_source(fmt, tmp_path)
        head = [first.poll().copy() for _ in range(stop)]
        position = first.snapshot()
        again = open_source(fmt, tmp_path)
        again.restore([position])
        assert rows_of(Batch.concat(head + drain(again))) == rows_of(Batch.concat(whole))


def test_a_killed_job_reading_files_resumes_from_its_checkpoint_exactly(tmp_path):
    parts = [table(30000, 6), table(30000, 7)]
    write("csv", tmp_path / "in", parts)
    chk = str(tmp_path / "chk")
    die, crash = die_once_units_are_checkpointed(tmp_path, chk)
    p = Pipeline(channel_capacity=1 << 16)
    p.from_csv("src", str(tmp_path / "in"), parallelism=2, batch_size=50).process("die", die).collect("out")
    with pytest.warns(UserWarning, match="restarting"):
        out = p.run(checkpoint_dir=chk, checkpoint_interval=0.01)["out"]
    assert crash.fired and rows_of(out) == rows_of(pa.concat_tables(parts))


def test_a_slow_instance_reads_fewer_units(tmp_path):
    """The instances take units as they finish the last (a shared counter): the instance that
    took unit 0 (the first taken) holds its batch until the other two units went through the
    other instance. Units i, i + p, ... per instance would leave unit 2 to the held one, and
    the wait would time out."""
    import multiprocessing

    from conftest import wait_until

    parts = [table(700, 20 + g).append_column("g", pa.array(np.full(700, g))) for g in range(3)]
    pq.write_table(pa.concat_tables(parts), tmp_path / "in.parquet", row_group_size=700)  # 3 units
    others = multiprocessing.get_context("fork").Value("i", 0)  # rows of units 1 and 2 passed

    def hold_unit_0(batch):
        if batch.num_rows and batch["g"][0] == 0:
            wait_until(lambda: others.value == 1400, timeout=60, what="the other instance to read units 1 and 2")
        elif batch.num_rows:
            with others.get_lock():
                others.value += batch.num_rows
        return batch

    p = Pipeline()
    p.from_parquet("src", str(tmp_path / "in.parquet"), parallelism=2, batch_size=1000).map("hold", hold_unit_0) \
        .collect("out")
    result = p.run()
    done = sorted(s.position["done"] for s in result.operators if s.name == "src")
    assert done == [[0], [1, 2]] and result["out"].num_rows == 2100


def test_a_unit_half_read_before_a_restore_survives_a_second_restore(tmp_path):
    """A restore hands the unit in hand back to its instance, which keeps it in its position
    until it read it: a checkpoint taken before it polled again still holds it."""
    write("csv", tmp_path, [table(2500, 4)])
    whole = drain(open_source("csv", tmp_path))
    first = open_source("csv", tmp_path)
    head = [first.poll().copy() for _ in range(3)]
    assert first.snapshot()["unit"] is not None and first.snapshot()["rows"] > 0  # inside a unit
    once = open_source("csv", tmp_path)
    once.restore([first.snapshot()])
    twice = open_source("csv", tmp_path)
    twice.restore([once.snapshot()])  # taken before `once` read anything
    assert rows_of(Batch.concat(head + drain(twice))) == rows_of(Batch.concat(whole))


def test_positions_of_two_instances_restore_into_three(tmp_path):
    """Two instances sharing one counter read a while; their positions go to three new ones
    (rescaled): the units in hand are dealt out, the rest shared; every row comes once."""
    import itertools

    write("json", tmp_path, [table(2000, 11), table(900, 12)])
    whole = drain(open_source("json", tmp_path))

    def instances(parallelism):
        claim = itertools.count().__next__
        out = []
        for i in range(parallelism):
            source = files.FileSource("json", str(tmp_path), 300)
            source.open(Context("src", i, parallelism, claim=claim))
            out.append(source)
        return out

    a, b = instances(2)
    head = [a.poll().copy() for _ in range(3)] + [b.poll().copy() for _ in range(5)]
    states = [a.snapshot(), b.snapshot()]
    rest = []
    for source in instances(3):
        source.ctx.rescaled = True
        source.restore(states)
        rest += drain(source)
    assert rows_of(Batch.concat(head + rest)) == rows_of(Batch.concat(whole))


def test_a_position_of_other_files_is_refused(tmp_path):
    write("csv", tmp_path, [table(500, 13)])
    first = open_source("csv", tmp_path)
    first.poll()
    position = first.snapshot()
    write("csv", tmp_path, [table(600, 14)])  # the file changed since
    again = open_source("csv", tmp_path)
    with pytest.raises(SourceError, match="changed since the checkpoint"):
        again.restore([position])


def test_a_file_source_checkpointed_at_parallelism_2_resumes_at_3(tmp_path):
    """Every instance's position goes to every instance on restore: the units in hand go on
    from their rows and the untaken ones are shared anew, at any parallelism; sums by key over
    the two runs equal numpy's over the files."""
    parts = [table(30000, 9), table(20000, 10)]
    write("csv", tmp_path / "in", parts)
    chk = str(tmp_path / "chk")
    die, crash = die_once_units_are_checkpointed(tmp_path, chk)

    def job(parallelism, fn):
        p = Pipeline(channel_capacity=1 << 16)
        (p.from_csv("src", str(tmp_path / "in"), parallelism=parallelism, batch_size=50).process("die", fn)
          .key_by("key").aggregate("agg", {"n": "sum", "*": "count"}, parallelism=1).collect("out"))
        return p

    with pytest.raises(Exception, match="killed by SIGKILL"):
        job(2, die).run(checkpoint_dir=chk, checkpoint_interval=0.01, restarts=0)
    assert crash.fired
    out = job(3, Operator).run(checkpoint_dir=chk, resume=True)["out"]
    whole = pa.concat_tables(parts)
    want: dict = {}
    for k, n in zip(whole.column("key").to_pylist(), whole.column("n").to_pylist()):
        total, count = want.get(k, (0, 0))
        want[k] = (total + (n or 0), count + 1)
    got = {k: (int(n), int(c)) for k, n, c in zip(out["key"].to_numpy().tolist(), out["n_sum"].tolist(),
                                                  out["count"].tolist())}
    assert got == want

def test_csv_quoted_line_ends_need_newlines_in_values(tmp_path):
    text = "k,v\n" + "".join(f'{i},"line {i}\nstill {i}"\n' for i in range(400))
    (tmp_path / "q.csv").write_text(text)
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "q.csv"), parallelism=3, newlines_in_values=True).collect("out")
    out = p.run()["out"]
    assert sorted(zip(out["k"].tolist(), out["v"])) == [(i, f"line {i}\nstill {i}") for i in range(400)]


def test_csv_types_nulls_and_a_given_schema(tmp_path):
    (tmp_path / "t.csv").write_text('i,f,s,b,t\n1,2.5,x,true,2026-11-24 10:00:00\n,,,,\n3,4,"",false,2026-11-24\n')
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "t.csv")).collect("out")
    out = p.run()["out"]
    assert out.schema == (("i", "<i8?"), ("f", "<f8?"), ("s", "utf8?"), ("b", "|b1?"), ("t", "<M8[s]?"))
    assert out["i"].tolist() == [1, None, 3] and list(out["s"]) == ["x", None, ""]  # "" quoted: empty, not null
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "t.csv"), schema={"i": "float64", "s": "str", "b": "str"}).collect("out")
    out = p.run()["out"]
    assert out["i"].dtype == np.float64 and list(out["b"]) == ["true", None, "false"]


def test_a_time_of_day_column_is_read_as_str(tmp_path):
    (tmp_path / "t.csv").write_text("k,at\n1,12:30:00\n2,\n")  # pyarrow infers time32: numpy has none
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "t.csv")).collect("out")
    out = p.run()["out"]
    assert out.schema == (("k", "<i8"), ("at", "utf8?")) and list(out["at"]) == ["12:30:00", None]


def test_json_nulls_and_missing_fields(tmp_path):
    (tmp_path / "a.json").write_text('{"k": "a", "v": 1}\n{"k": null, "v": 2}\n{"k": "c"}\n')
    p = Pipeline()
    p.from_json("src", str(tmp_path / "a.json")).collect("out")
    out = p.run()["out"]
    assert list(out["k"]) == ["a", None, "c"] and out["v"].tolist() == [1, 2, None]


def test_a_glob_reads_the_files_it_matches(tmp_path):
    write("parquet", tmp_path, [table(100, 8), table(50, 9)])
    pq.write_table(table(7, 10), tmp_path / "other.parquet")
    p = Pipeline()
    p.from_parquet("src", str(tmp_path / "part-*.parquet"), columns=["key", "n"]).collect("out")
    out = p.run()["out"]
    assert out.num_rows == 150 and list(out) == ["key", "n"]


def bad(tmp_path, fmt, **options):
    p = Pipeline()
    SOURCES[fmt](p, "src", str(tmp_path), **options).collect("out")
    with pytest.raises(OperatorError) as raised:
        p.run()
    return str(raised.value)


def test_files_with_other_columns_or_types_are_an_error_naming_both_files(tmp_path):
    (tmp_path / "a.csv").write_text("k,v\n1,2\n")
    (tmp_path / "b.csv").write_text("k,w\n1,2\n")
    message = bad(tmp_path, "csv")
    assert "b.csv: its column 2 is column 'w', but" in message and "a.csv has 'v' there" in message
    pdir = tmp_path / "pq"
    pdir.mkdir()
    pq.write_table(pa.table({"k": [1], "v": [2]}), pdir / "a.parquet")
    pq.write_table(pa.table({"k": [1], "v": ["two"]}), pdir / "b.parquet")
    message = bad(pdir, "parquet")
    assert "b.parquet: column 'v' is string, but in" in message and "a.parquet it is int64" in message


def test_a_value_that_does_not_fit_its_inferred_type_names_the_file_and_suggests_a_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "SAMPLE", 64)  # inferred from the first lines only
    (tmp_path / "a.csv").write_text("k,v\n" + "".join(f"{i},{i}\n" for i in range(50)) + "50,1.5\n")
    message = bad(tmp_path, "csv")
    assert "a.csv" in message and "conversion error to int64: invalid value '1.5'" in message and "schema=" in message


def test_ragged_rows_duplicate_headers_and_empty_files_are_errors_naming_the_file(tmp_path):
    (tmp_path / "r.csv").write_text("k,v\n1,2\n3\n")
    assert "r.csv: CSV parse error" in bad(tmp_path, "csv") and "Expected 2 columns, got 1: 3" in bad(tmp_path, "csv")
    (tmp_path / "r.csv").write_text("k,v,k\n1,2,3\n")
    assert "r.csv, line 1: column 'k' appears twice in the header" in bad(tmp_path, "csv")
    (tmp_path / "r.csv").write_text("")
    assert "r.csv: empty CSV file" in bad(tmp_path, "csv")


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_truncated_or_corrupt_files_are_an_error_naming_the_file(tmp_path, fmt):
    path = write(fmt, tmp_path, [table(500, 11)])[0]
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    assert os.path.basename(path) in bad(tmp_path, fmt)


def test_a_path_with_no_file_is_an_error_at_once(tmp_path):
    with pytest.raises(SourceError, match="no file to read at"):
        Pipeline().from_parquet("src", str(tmp_path / "missing" / "*.parquet"))


ORDERS = [("ann", 2, 12.5), ("bob", 1, 9.99), ("ann", 3, 10.0), ("cy", 5, 30.25), ("bob", 4, 11.0), ("cy", 1, 2.0)]
# price >= 10 kept; per customer: qty sum, price sum, count (by hand)
PER_CUSTOMER = {"ann": (5, 22.5, 2), "bob": (4, 11.0, 1), "cy": (5, 30.25, 1)}


def readme_block(heading, index=0):
    """The index-th python code block after a README heading."""
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split(heading + "\n", 1)[1]
    return section.split("```python\n")[index + 1].split("```", 1)[0]


def write_orders(directory):
    os.makedirs(directory / "orders")
    for name, rows in (("a.csv", ORDERS[:3]), ("b.csv", ORDERS[3:])):
        lines = ["customer,qty,price"] + [f"{c},{q},{p}" for c, q, p in rows]
        (directory / "orders" / name).write_text("\n".join(lines) + "\n")


def per_customer_files(directory):
    table = pq.read_table(sorted(str(f) for f in directory.glob("*.parquet"))).sort_by("customer")
    return {c: (q, p, n) for c, q, p, n in zip(*(table.column(x).to_pylist()
                                                 for x in ("customer", "qty_sum", "price_sum", "count")))}


def test_the_readme_ingestion_example_gives_its_result(tmp_path, monkeypatch):
    write_orders(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(readme_block("## Connectors: files, Arrow, Redis Streams"), {})
    assert per_customer_files(tmp_path / "per_customer") == PER_CUSTOMER


def test_quoted_line_ends_and_a_quote_inside_an_unquoted_field(tmp_path):
    """With newlines_in_values a file is read whole by one instance: a quote inside an unquoted
    field (5'11") made a cut by quote counting land inside a quoted value (phantom rows)."""
    rows = [(i, f"{i}\n-{i},fake" if i % 3 else "5'11\"") for i in range(200_000)]  # > 1 MiB: several cuts before
    with open(tmp_path / "q.csv", "w", newline="") as f:
        f.write("id,note\n")
        for i, note in rows:
            f.write(f'{i},"{note}"\n' if "\n" in note else f"{i},{note}\n")
    want = pa.csv.read_csv(tmp_path / "q.csv", parse_options=pa.csv.ParseOptions(newlines_in_values=True))
    for parallelism in (1, 3):
        p = Pipeline()
        p.from_csv("src", str(tmp_path / "q.csv"), parallelism=parallelism, newlines_in_values=True).collect("out")
        out = p.run()["out"]
        order = np.argsort(out["id"])
        assert out["id"][order].tolist() == want["id"].to_pylist()
        assert [out["note"][i] for i in order] == want["note"].to_pylist()


def test_a_pipeline_run_again_reads_the_files_there_now(tmp_path):
    write("parquet", tmp_path, [table(10, 1)])
    p = Pipeline()
    p.from_parquet("src", str(tmp_path)).collect("out")
    assert p.run()["out"].num_rows == 10
    pq.write_table(table(20, 2), tmp_path / "part-9.parquet")
    assert p.run()["out"].num_rows == 30


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffid,v\n1,a\n2,b\n".encode())
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "bom.csv"), parallelism=2).collect("out")
    out = p.run()["out"]
    assert [name for name, _ in out.schema] == ["id", "v"] and sorted(out["id"].tolist()) == [1, 2]


def test_an_unknown_schema_type_fails_the_job_naming_the_source_and_the_column(tmp_path):
    (tmp_path / "a.csv").write_text("a,b\n1,2\n")
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "a.csv"), schema={"b": "money"}).collect("out")
    with pytest.raises(OperatorError, match="operator 'src' instance 0 failed: SourceError: schema type 'money' of "
                                            "column 'b' is not one of"):
        p.run()


@pytest.mark.parametrize("transactional", [False, True])
def test_csv_sinks_keep_empty_strings_apart_from_nulls(tmp_path, transactional):
    s = StringColumn.from_strings(["a", "", "", 'say "hi", then\nleave'])
    s = StringColumn(s.offsets, s.data, np.array([False, False, True, False]))
    p = Pipeline()
    p.from_arrays("src", {"id": np.arange(4), "s": s}).to_files("out", str(tmp_path / "out"), "csv",
                                                                transactional=transactional)
    p.run()
    q = Pipeline()
    q.from_csv("back", str(tmp_path / "out"), newlines_in_values=True).collect("out")
    out = q.run()["out"]
    order = np.argsort(out["id"])
    assert [out["s"][i] for i in order] == ["a", "", None, 'say "hi", then\nleave']


def test_integers_beyond_int64_are_an_error_not_floats(tmp_path):
    (tmp_path / "big.csv").write_text("id,n\n1,3\n2,99999999999999999999\n")
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "big.csv")).collect("out")
    with pytest.raises(OperatorError, match=r"big.csv: column 'n' holds integers beyond int64 .*schema=\{'n': "):
        p.run()
    q = Pipeline()
    q.from_csv("src", str(tmp_path / "big.csv"), schema={"n": "str"}).collect("out")
    assert list(q.run()["out"]["n"]) == ["3", "99999999999999999999"]
    (tmp_path / "f.csv").write_text("id,x\n1,2.5\n2,3\n")  # floats stay floats
    r = Pipeline()
    r.from_csv("src", str(tmp_path / "f.csv")).collect("out")
    assert r.run()["out"]["x"].tolist() == [2.5, 3.0]


def test_the_big_integer_check_reads_past_a_first_run_of_integers(tmp_path):
    """The check settles a column on its first 64 KiB when a value there has a point; a column
    of integers there is decided by the whole sample (1 MiB): a float later keeps it float, an
    integer beyond int64 later is the error."""
    ints = "".join(f"{i},{i}\n" for i in range(20_000))  # about 200 KiB of integers first
    (tmp_path / "late_float.csv").write_text("id,x\n" + ints + "20000,2.5\n")
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "late_float.csv")).collect("out")
    x = p.run()["out"]["x"]
    assert x.dtype == np.float64 and x[-1] == 2.5 and x[:20_000].tolist() == list(map(float, range(20_000)))
    (tmp_path / "late_big.csv").write_text("id,n\n" + ints + "20000,99999999999999999999\n")
    q = Pipeline()
    q.from_csv("src", str(tmp_path / "late_big.csv")).collect("out")
    with pytest.raises(OperatorError, match=r"late_big.csv: column 'n' holds integers beyond int64"):
        q.run()

def test_blank_lines_are_skipped(tmp_path):
    (tmp_path / "b.csv").write_text("id,v\n1,a\n\n2,b\n\n")
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "b.csv")).collect("out")
    out = p.run()["out"]
    assert out["id"].tolist() == [1, 2] and list(out["v"]) == ["a", "b"]


def test_a_pipeline_run_again_reads_its_files_as_they_are_then(tmp_path):
    """The coordinator plans the files again before each run when they changed: every
    worker reads one plan, the new one."""
    write("csv", tmp_path / "in", [table(300, 15)])
    p = Pipeline()
    p.from_csv("src", str(tmp_path / "in"), parallelism=2).collect("out")
    assert rows_of(p.run()["out"]) == rows_of(table(300, 15))
    write("csv", tmp_path / "in", [table(5000, 16), table(700, 17)])
    assert rows_of(p.run()["out"]) == rows_of(pa.concat_tables([table(5000, 16), table(700, 17)]))


def test_files_rewritten_before_a_restart_are_refused(tmp_path):
    """A worker dies after a checkpoint, and the file is rewritten before the restart (same
    size, other rows): the positions name the old plan, so the restore refuses it instead of
    skipping rows of the new content."""
    write("parquet", tmp_path / "in", [table(3000, 18)])
    chk = str(tmp_path / "chk")
    die, crash = die_once_checkpointed(tmp_path, chk, last_words=lambda: write("parquet", tmp_path / "in",
                                                                              [table(3000, 19)]))
    p = Pipeline()
    p.from_parquet("src", str(tmp_path / "in"), batch_size=10).process("die", die).collect("out")
    with pytest.warns(UserWarning, match="restarting") as restarts, \
            pytest.raises(RestoreError, match="restoring its state from the checkpoint: SourceError: .*changed since"):
        p.run(checkpoint_dir=chk, checkpoint_interval=0.01, restarts=3)
    assert crash.fired
    assert len([w for w in restarts if "restarting" in str(w.message)]) == 1  # not retried: it would fail again


def test_a_file_source_made_in_its_workers_shares_units_too(tmp_path):
    """A FileSource built by the factory in each worker plans there; the instances still
    take units from the attempt's shared counter: every row once."""
    write("json", tmp_path / "in", [table(2000, 21), table(500, 22)])
    p = Pipeline()
    p.source("src", lambda: files.FileSource("json", str(tmp_path / "in"), 100), parallelism=3).collect("out")
    result = p.run()
    assert rows_of(result["out"]) == rows_of(pa.concat_tables([table(2000, 21), table(500, 22)]))
    done = [unit for s in result.operators if s.name == "src" for unit in s.position["done"]]
    assert sorted(done) == sorted(set(done)) and len(done) > 3


def test_a_bad_csv_row_is_named_by_its_line_and_column(tmp_path):
    """pyarrow counts rows from the start of the part it parses, without empty lines, and
    columns by number; the error says the file's line and the column's name, whether the
    schema's sample (the first file) or a later part of another file holds the row."""
    good = ["k,qty,price"] + [f"k{i},{i},{i}.5" for i in range(400)]
    lines = list(good)
    lines[300] = "k299,oops,3.5"  # line 301, in a later unit (units of 2 KiB here)
    lines.insert(150, "")  # an empty line before it: the bad row is line 302 now
    for first in ([], good):  # the bad file alone (read to infer the schema), or after a good one
        data = tmp_path / f"d{len(first)}"
        data.mkdir()
        if first:
            (data / "a.csv").write_text("\n".join(first) + "\n")
        (data / "b.csv").write_text("\n".join(lines) + "\n")
        p = Pipeline()
        p.from_csv("src", str(data), schema={"qty": "int64"}).collect("out")
        with pytest.raises(OperatorError, match=r"b.csv: In CSV column 'qty': line 302: CSV conversion error to "
                                                r"int64: invalid value 'oops'; fix the value"):
            p.run()
    ragged = list(good)
    ragged[250] = "k249,3"  # line 251
    (tmp_path / "d401" / "b.csv").write_text("\n".join(ragged) + "\n")
    q = Pipeline()
    q.from_csv("src", str(tmp_path / "d401"), schema={"qty": "int64"}).collect("out")
    with pytest.raises(OperatorError, match=r"b.csv: CSV parse error: line 251: Expected 3 columns, got 2"):
        q.run()
