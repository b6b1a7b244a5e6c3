"""Files: sources of Parquet, CSV, JSON lines and Arrow IPC files through pyarrow (the ``arrow``
extra), and the writers of the file sinks (CSV by mpstream itself, Parquet and Arrow IPC
through pyarrow).

A source reads one path, a directory (its files, recursively, in name order, skipping names
that start with ``.`` or ``_``) or a glob. Its files are cut into **units**: a Parquet row
group, an Arrow IPC record batch, a byte range of a CSV or JSON-lines file (about ``UNIT``
bytes, cut at line ends: a range owns the records that start in it). A CSV file with
``newlines_in_values`` is one unit: only a parse from its start knows which line ends are
inside quotes. The instances share the units (:class:`~mpstream.sources.Units`) as Flink's
file source shares its splits: each
takes the next unit of the list when it finished its last (:attr:`Context.claim
<mpstream.operators.Context.claim>`: a counter in memory that the coordinator maps for every
attempt before it forks the workers), so a slower instance reads fewer units and all end
together; every byte is read once. Each unit is read as a stream of batches, so memory holds
a few batches whatever the file size (files are memory-mapped). The position is the units
done, the unit in hand with the rows read of it, and the units (with their rows) the instance
goes on with after a restore; a restore gives every instance the positions of all (at any
parallelism): at the same parallelism each goes on with its own unit in hand and queue, at
another those are dealt out anew; then the units nobody had taken are shared again, so a
replay gives the same records. A position names its plan (the files' paths, sizes and times,
and their units): files changed since the checkpoint are an error, not a wrong replay.

Schemas: Parquet and IPC files carry theirs; CSV and JSON are inferred by pyarrow from the
first MiB of the first file (int64, float64, bool, timestamp, date, else str; a time of day
such as ``12:30:00`` and a column with no value there are str; integers beyond int64 are an
error, not floats), or given with
``schema={column: type}``. A file whose schema (or CSV
header) differs from the first file's is an error naming both files and the column; a value
that does not fit its column's type is an error naming the file and the column, suggesting
``schema=``. In CSV, an empty field is null (a quoted empty string ``""`` is an empty
string); a JSON null or a missing field is null. Corrupt or truncated files are an error
naming the file.
"""

from __future__ import annotations

import csv as _csv
import glob
import hashlib
import mmap
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrow import from_arrow, pyarrow_or_error
from .batch import Batch
from .errors import SourceError
from .operators import Context
from .sources import UnitSource, Units

__all__ = ["FileSource", "FORMATS", "list_files", "FileWriter", "CsvWriter", "ArrowWriter", "new_writer"]

FORMATS = ("parquet", "csv", "json", "arrow")
UNIT = 2 << 20  # bytes: a CSV / JSON unit (a slower instance is at most one unit late at the end)
SAMPLE = 1 << 20  # bytes of the first file that CSV and JSON schemas are inferred from
BLOCK = 1 << 20  # bytes pyarrow parses at a time


def list_files(path: str) -> list[str]:
    """The files of a path, a directory (recursively) or a glob, sorted; hidden and ``_``
    files skipped. An error when there are none."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = [os.path.join(root, name) for root, dirs, names in os.walk(path) for name in names
                 if not name.startswith((".", "_"))
                 and not any(part.startswith((".", "_")) for part in os.path.relpath(root, path).split(os.sep)
                             if part != ".")]
    else:
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    if not found:
        raise SourceError(f"no file to read at {path!r} (a file, a directory of files, or a glob)")
    return sorted(found)


@dataclass(frozen=True)
class Unit:
    """One piece of a file that one instance reads: a row group or record batch (``index``),
    or the bytes ``start:stop`` of a CSV or JSON file."""

    path: str
    index: int = 0
    start: int = 0
    stop: int = 0


class FileSource(UnitSource):
    """Reads files of one format (see the module doc). ``schema`` (CSV and JSON): column ->
    type (``"int64"``, ``"float64"``, ``"bool"``, ``"str"``, a numpy dtype or a pyarrow type)
    for the columns not to infer; ``columns`` (Parquet and IPC): the columns to read."""

    def __init__(self, fmt: str, path: str, batch_size: int, schema: Mapping[str, Any] | None = None,
                 columns: Sequence[str] | None = None, delimiter: str = ",", newlines_in_values: bool = False) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"file format must be one of {FORMATS}, got {fmt!r}")
        self.fmt, self.path, self.batch_size = fmt, path, batch_size
        self.schema_hint, self.columns = schema, columns
        self.delimiter, self.newlines_in_values = delimiter, newlines_in_values
        self.pa: Any = None
        self.files: list[str] = []
        self.arrow_schema: Any = None
        self._all_units: list[Unit] | None = None  # of every instance, in reading order

    # ---- planning: the same in every instance ----------------------------------------------

    def plan(self) -> FileSource:
        """Lists the files, infers their schema and cuts them into units once, in the caller's
        process before the workers are forked: they inherit all of it, and pyarrow's readers
        warmed up (their first use in a process costs milliseconds). A failure is left to
        :meth:`open` to report."""
        self.pa = pyarrow_or_error(f"{self.fmt} files")
        import pyarrow.csv  # noqa: F401  (the readers: submodules pyarrow does not load itself)
        import pyarrow.ipc  # noqa: F401
        import pyarrow.json  # noqa: F401
        self._adopt(list_files(self.path), deferred=True)
        return self

    def refresh(self) -> None:
        """Plans again if the files changed since the plan. The coordinator calls it before
        each attempt forks its workers, so all of them read one plan, made anew when the files
        changed between runs."""
        try:
            if self._signature(list_files(self.path)) == self._planned:
                return
            self.plan()
        except (SourceError, OSError):
            self._all_units = None  # open() reports it, naming the operator

    def _adopt(self, files: list[str], deferred: bool) -> None:
        """Plans files: their schema, their units and the plan's id (what positions name).
        A SourceError is raised, or with ``deferred`` left to :meth:`open` to report."""
        self.files, self._planned = files, self._signature(files)
        try:
            self.arrow_schema = self._schema()
            self._all_units = [unit for path in files for unit in self._units(path)]
        except SourceError:
            if not deferred:
                raise
            self._all_units = None
            return
        self._plan_id = hashlib.sha256(repr((self._planned, self._all_units)).encode()).hexdigest()[:16]

    @staticmethod
    def _signature(files: list[str]) -> tuple[Any, ...]:
        """What a plan stands on: the files, their sizes and times."""
        return tuple((path, (stat := os.stat(path)).st_size, stat.st_mtime_ns) for path in files)

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        if self.pa is None:
            self.plan()  # made in its worker: planned here
        files = list_files(self.path)
        if self._all_units is None:
            self._adopt(files, deferred=False)  # raises what planning met
        elif self._signature(files) != self._planned:
            raise SourceError(f"{self.path}: the files changed while the job started, after the coordinator "
                              f"planned them; run the job again")
        self.units = Units(len(self._all_units), ctx, self._plan_id)
        self._reader: Iterator[Any] | None = None

    def _schema(self) -> Any:
        """The schema every file must have (the first file's, or inferred from it)."""
        pa, first = self.pa, self.files[0]
        if self.fmt == "parquet":
            return self._parquet(first).schema_arrow
        if self.fmt == "arrow":
            return self._ipc(first).schema
        hints = self._hint_types()
        if self.fmt == "csv":  # pyarrow's streaming reader infers from its first block, cut by its own parser
            names = self._header(first)
            whole = self._buffer(first, 0, os.path.getsize(first))
            inferred = self._guard(first, 0, lambda: self._csv_reader(whole, first, 0, hints, header=True,
                                                                      block=SAMPLE))
            self._check_integers(first, whole, inferred.schema, hints)
        else:
            sample = self._buffer(first, 0, self._boundary(first, SAMPLE))
            inferred = self._guard(first, 0, lambda: pa.json.read_json(
                pa.BufferReader(sample), read_options=pa.json.ReadOptions(use_threads=False)))
            names = inferred.schema.names
        fields = []
        for name in names:
            typ = hints.get(name, inferred.schema.field(name).type if name in inferred.schema.names else pa.null())
            if pa.types.is_null(typ) or pa.types.is_string(typ) or (name not in hints and pa.types.is_time(typ)):
                typ = pa.large_string()  # mpstream's layout; a time of day (no date) has no numpy type: str
            fields.append(pa.field(name, typ))
        return pa.schema(fields)

    def _check_integers(self, path: str, whole: Any, schema: Any, hints: dict[str, Any]) -> None:
        """pyarrow infers float64 for a column of integers beyond int64: an error, not a silent
        loss of digits (a column of floats written without a point or exponent is one too)."""
        pa = self.pa
        floats = [f.name for f in schema if pa.types.is_floating(f.type) and f.name not in hints]
        if not floats:
            return
        import pyarrow.compute as pc

        for block in (SAMPLE // 16, SAMPLE):  # a value with a point or an exponent early on settles a column
            try:
                text = self._csv_reader(whole, path, 0, {**hints, **dict.fromkeys(floats, pa.string())}, header=True,
                                        block=block, columns=floats).read_next_batch()
            except (SourceError, pa.ArrowInvalid):
                if block == SAMPLE:
                    raise
                continue  # a row longer than the small block: the whole sample decides
            values = {name: pc.drop_null(text.column(name)) for name in floats}
            floats = [name for name in floats
                      if pc.all(pc.match_substring_regex(values[name], r"^\s*[-+]?\d+\s*$")).as_py() is not False]
            if not floats:
                return
        name = next((name for name in floats if len(values[name])), None)
        if name is not None:
            raise SourceError(f"{path}: column {name!r} holds integers beyond int64 (e.g. "
                              f"{values[name][0].as_py()!r}); give its type with schema=, e.g. "
                              f"schema={{{name!r}: 'float64'}} or 'str'")

    def _hint_types(self) -> dict[str, Any]:
        pa = self.pa
        names = {"str": pa.large_string(), "string": pa.large_string(), "utf8": pa.large_string()}
        out = {}
        for column, typ in (self.schema_hint or {}).items():
            if isinstance(typ, pa.DataType):
                out[column] = typ
            elif isinstance(typ, str) and typ in names:
                out[column] = names[typ]
            else:
                try:
                    out[column] = pa.from_numpy_dtype(np.dtype(typ))
                except (TypeError, pa.ArrowNotImplementedError):
                    raise SourceError(f"schema type {typ!r} of column {column!r} is "
                                      f"not one of 'int64', 'float64', 'bool', 'str', a numpy dtype or a "
                                      f"pyarrow type") from None
        return out

    def _units(self, path: str) -> list[Unit]:
        if self.fmt == "parquet":
            reader = self._parquet(path)
            self._check_schema(path, reader.schema_arrow)
            return [Unit(path, g) for g in range(reader.num_row_groups)]
        if self.fmt == "arrow":
            reader = self._ipc(path)
            self._check_schema(path, reader.schema)
            return [Unit(path, i) for i in range(reader.num_record_batches)]
        size = os.path.getsize(path)
        start = 0
        if self.fmt == "csv":
            if self._header(path) != self.arrow_schema.names:
                self._differs(path, self._header(path))
            start = self._boundary(path, 0, header=True)
        share = size if self.fmt == "csv" and self.newlines_in_values else UNIT  # one unit: see _boundary
        cuts = [start] + [self._boundary(path, at) for at in range(start + share, size, share)] + [size]
        cuts = sorted(set(cuts))
        return [Unit(path, i, a, b) for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]

    def _check_schema(self, path: str, schema: Any) -> None:
        if not schema.equals(self.arrow_schema):
            self._differs(path, schema.names, schema)

    def _differs(self, path: str, names: list[str], schema: Any = None) -> None:
        first = self.arrow_schema
        for i, name in enumerate(first.names):
            if i >= len(names) or names[i] != name:
                got = f"column {names[i]!r}" if i < len(names) else "no column"
                raise SourceError(f"{path}: its column {i + 1} is {got}, but {self.files[0]} has {name!r} there; "
                                  f"every file of a source needs the same columns")
            if schema is not None and not schema.field(name).type.equals(first.field(name).type):
                raise SourceError(f"{path}: column {name!r} is {schema.field(name).type}, but in {self.files[0]} it "
                                  f"is {first.field(name).type}; every file of a source needs the same schema")
        raise SourceError(f"{path}: it has {len(names)} columns, {self.files[0]} has {len(first.names)}: "
                          f"{names[len(first.names):]} more; every file of a source needs the same columns")

    # ---- file access --------------------------------------------------------------------------

    def _guard(self, path: str, start: int, fn: Any) -> Any:
        """fn(), with pyarrow's errors (a corrupt file, a value that does not fit) naming the file."""
        pa = self.pa
        try:
            return fn()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            message = str(exc)
            if self.fmt == "csv":
                message = self._csv_where(path, start, message)
            where = f" (in the bytes from offset {start})" if start and "line " not in message else ""
            hint = "; fix the value, or give the column a type that holds it with schema=" \
                if "conversion error" in message else ""
            raise SourceError(f"{path}{where}: {message}{hint}") from None

    def _csv_where(self, path: str, start: int, message: str) -> str:
        """pyarrow's "Row #N" of a CSV part (its N-th line that is not empty, counted from byte
        start) as the file's line, and its "column #i" as the column's name."""
        column = re.search(r"column #(\d+)", message)
        names = self.arrow_schema.names if self.arrow_schema is not None else self._header(path)
        if column and int(column.group(1)) < len(names):
            message = message.replace(column.group(0), f"column {names[int(column.group(1))]!r}")
        row = re.search(r"Row #(\d+)", message)
        if row is None or self.newlines_in_values:  # a quoted line end: rows are not lines
            return message
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            line = sum(data[at : min(at + BLOCK, start)].count(b"\n") for at in range(0, start, BLOCK))
            at, left = start, int(row.group(1))
            while at < len(data) and left:
                end = data.find(b"\n", at)
                end = len(data) if end < 0 else end
                line += 1
                left -= data[at:end] not in (b"", b"\r")
                at = end + 1
        return message if left else message.replace(row.group(0), f"line {line}")

    def _parquet(self, path: str) -> Any:
        import pyarrow.parquet as pq

        return self._guard(path, 0, lambda: pq.ParquetFile(path, memory_map=True))

    def _ipc(self, path: str) -> Any:
        return self._guard(path, 0, lambda: self.pa.ipc.open_file(self.pa.memory_map(path)))

    def _buffer(self, path: str, start: int, stop: int) -> Any:
        """Bytes start:stop of a file, memory-mapped (no copy)."""
        mapped = self.pa.memory_map(path)
        mapped.seek(start)
        return mapped.read_buffer(stop - start)

    def _header(self, path: str) -> list[str]:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a byte order mark is not the first name
            line = f.readline()
        if not line.strip():
            raise SourceError(f"{path}: empty CSV file (a header row is required)")
        names = next(_csv.reader([line], delimiter=self.delimiter))
        duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if duplicate is not None:
            raise SourceError(f"{path}, line 1: column {duplicate!r} appears twice in the header; give every column "
                              f"its own name")
        return names

    def _boundary(self, path: str, at: int, header: bool = False) -> int:
        """The first record start at or after byte ``at`` (the end of the header line with
        ``header``): just past a line end. (Not for CSV with ``newlines_in_values``, whose
        files are not cut: only a parse from the start knows which line ends are in quotes.)"""
        size = os.path.getsize(path)
        if at >= size or (at <= 0 and not header):
            return min(max(at, 0), size)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = data.find(b"\n", 0 if header else at - 1)  # a record starts right after a line end
        return size if end < 0 else end + 1

    def _csv_reader(self, buffer: Any, path: str, start: int, types: dict[str, Any], header: bool = False,
                    block: int = BLOCK, columns: list[str] | None = None) -> Any:
        """A streaming reader of CSV bytes (a range: the columns are the schema's), of every
        column or of ``columns``."""
        csv = self.pa.csv
        read = csv.ReadOptions(use_threads=False, block_size=block,
                               column_names=None if header else self.arrow_schema.names)
        parse = csv.ParseOptions(delimiter=self.delimiter, newlines_in_values=self.newlines_in_values)
        convert = csv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True,
                                     quoted_strings_can_be_null=False, include_columns=columns or [])
        return self._guard(path, start, lambda: csv.open_csv(self.pa.BufferReader(buffer), read_options=read,
                                                             parse_options=parse, convert_options=convert))

    def _batches(self, unit: Unit) -> Iterator[Any]:
        """The record batches of a unit, in order."""
        pa = self.pa
        if self.fmt == "parquet":
            reader = self._parquet(unit.path)
            yield from reader.iter_batches(batch_size=self.batch_size, row_groups=[unit.index], columns=self.columns,
                                           use_threads=False)
        elif self.fmt == "arrow":
            batch = self._ipc(unit.path).get_batch(unit.index)
            yield batch if self.columns is None else batch.select(self.columns)
        else:
            buffer = self._buffer(unit.path, unit.start, unit.stop)
            if self.fmt == "csv":
                types = dict(zip(self.arrow_schema.names, self.arrow_schema.types))
                reader = self._csv_reader(buffer, unit.path, unit.start, types)
            else:
                read = pa.json.ReadOptions(use_threads=False, block_size=BLOCK)
                parse = pa.json.ParseOptions(explicit_schema=self.arrow_schema, unexpected_field_behavior="error")
                reader = self._guard(unit.path, unit.start, lambda: pa.json.open_json(
                    pa.BufferReader(buffer), read_options=read, parse_options=parse))
            while True:
                try:
                    batch = self._guard(unit.path, unit.start, reader.read_next_batch)
                except StopIteration:
                    return
                yield batch

    # ---- reading ------------------------------------------------------------------------------

    def next_of_unit(self) -> Batch | None:
        if self._reader is None:
            self._reader = self._skip(self._batches(self._all_units[self.units.unit]), self.units.rows)
        for record_batch in self._reader:  # never empty (see _skip)
            return self._convert(record_batch)
        self._reader = None
        return None

    def empty(self) -> Batch:
        schema = self.arrow_schema if self.columns is None else self.pa.schema(
            [self.arrow_schema.field(c) for c in self.columns])
        return from_arrow(schema.empty_table())

    def _skip(self, batches: Iterator[Any], rows: int) -> Iterator[Any]:
        """The batches after the first ``rows`` rows, cut to at most batch_size rows each."""
        for batch in batches:
            if rows >= batch.num_rows:
                rows -= batch.num_rows
                continue
            batch, rows = batch.slice(rows), 0
            for start in range(0, batch.num_rows, self.batch_size):
                yield batch.slice(start, self.batch_size)

    def _convert(self, record_batch: Any) -> Batch:
        try:
            return from_arrow(record_batch)
        except Exception as exc:
            raise SourceError(f"{self._all_units[self.units.unit].path}: {exc}") from None

    def restore(self, states: list[Any]) -> None:
        """The positions of every instance (see :class:`~mpstream.sources.Units`), of this
        plan of the files."""
        self.units.restore(states, lambda _: (
            f"the files of this source changed since the checkpoint (paths, sizes, modification times or units "
            f"differ: {self.path}); resume with the files it read, or start without resume"))
        self._reader = None


# ---- writers: the files of the file sinks ----------------------------------------------------

class FileWriter:
    """One output file: :meth:`write` batches (all of one schema), :meth:`close` makes it
    durable (fsync). ``size`` is how many bytes the batches held in memory, for rolling."""

    def __init__(self, path: str) -> None:
        self.path, self.size = path, 0

    def write(self, batch: Batch) -> None:
        self.size += batch.nbytes

    def close(self) -> None:
        raise NotImplementedError


class CsvWriter(FileWriter):
    """CSV (RFC 4180, no extra needed): a header row, then one row per record. A null is an
    empty field and an empty string is ``""``, so the CSV sources read back what was written;
    a field with a comma, a quote or a line end is quoted (quotes doubled). Python's csv module
    cannot tell the two apart before Python 3.12 (``QUOTE_NOTNULL``)."""

    def __init__(self, path: str, file: Any = None) -> None:
        super().__init__(path)
        self.file = file if file is not None else open(path, "w", newline="")

    def write(self, batch: Batch) -> None:
        super().write(batch)
        if self.file.tell() == 0:
            self.file.write(",".join(map(_csv_text, batch)) + "\r\n")
        columns = [_csv_column(c.tolist()) for c in batch.to_numpy().values()]
        self.file.write("".join(",".join(row) + "\r\n" for row in zip(*columns)))

    def durable(self) -> int:
        """Flushes and fsyncs; the file's length."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        self.durable()
        self.file.close()


def _csv_text(text: str) -> str:
    if not text or '"' in text or "," in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def _csv_column(values: list[Any]) -> list[str]:
    """A column's CSV fields: None (null) empty, strings quoted as needed, others as str()."""
    if any(isinstance(v, str) for v in values):
        return ["" if v is None else _csv_text(v) for v in values]
    return ["" if v is None else str(v) for v in values]


class ArrowWriter(FileWriter):
    """Parquet (``fmt="parquet"``) or an Arrow IPC file (``fmt="arrow"``), through pyarrow."""

    def __init__(self, path: str, fmt: str) -> None:
        super().__init__(path)
        self.pa, self.fmt, self._writer = pyarrow_or_error(f"writing {fmt} files"), fmt, None

    def write(self, batch: Batch) -> None:
        super().write(batch)
        table = batch.to_arrow()
        if self._writer is None:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                self._writer = pq.ParquetWriter(self.path, table.schema)
            else:
                import pyarrow.ipc

                self._writer = pyarrow.ipc.new_file(self.path, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())


def new_writer(fmt: str, path: str) -> FileWriter:
    """A writer of a sink format: "csv", "parquet" or "arrow"."""
    return CsvWriter(path) if fmt == "csv" else ArrowWriter(path, fmt)
