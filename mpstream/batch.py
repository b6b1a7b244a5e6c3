"""Columnar batches and their frame format in a ring record.

A :class:`Batch` is an ordered set of named 1-D columns of equal length. Numeric columns are
numpy arrays (bool, signed/unsigned ints, float32/64, datetime64, timedelta64); text columns
are :class:`StringColumn` (UTF-8, Arrow-style offsets + bytes).

**Nulls.** A column may hold missing values: a numeric one is then a ``numpy.ma.MaskedArray``
(its mask True where a value is null, so numpy arithmetic carries the nulls along), a string
one a :class:`StringColumn` with a ``mask``. Such a column is *nullable* (its schema dtype
ends in ``?``) even in a batch where no value is null. A null's value is stored as 0 (or as
the empty string), so hashing and partitioning put every null key in one place.

Frame format (one channel):

* a SCHEMA record, sent before the first batch and whenever the columns change: UTF-8 JSON
  ``{"columns": [[name, dtype], ...]}`` where dtype is numpy's ``dtype.str`` or ``"utf8"``,
  followed by ``?`` for a nullable column;
* a DATA record per batch: ``uint64 num_rows``, then for each buffer ``uint64 offset, uint64
  nbytes`` (offset from the payload start), then the buffers. A numeric column is one buffer;
  a string column two (int64 offsets, uint8 bytes); a nullable column has one more, its null
  mask (one byte per row, 1 = null). Each buffer starts on a 64-byte boundary of the ring,
  the Arrow IPC rule; a reader relies on it (it slices every buffer out of a view of the whole
  ring of the buffer's dtype) and refuses a header that breaks it (LayoutError).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Union

import numpy as np
import numpy.ma  # noqa: F401  (nullable columns; numpy loads it lazily, and a worker would pay ~15 ms for it)
from numpy.typing import ArrayLike

from ._mps import ffi, lib
from .errors import BatchShapeError, LayoutError, SchemaError

__all__ = ["Batch", "StringColumn", "Column", "BatchShapeError", "null_mask", "values_of"]

BUFFER_ALIGNMENT = 64
_STRING = "utf8"
_NULLABLE = "?"  # a schema dtype's suffix: the column carries a null mask
_NUMERIC_KINDS = frozenset("biufmM")
_INT64, _UINT8, _BOOL = np.dtype(np.int64), np.dtype(np.uint8), np.dtype(np.bool_)
_new_object = object.__new__


class StringColumn:
    """A column of UTF-8 strings stored as Arrow does: ``offsets`` (int64, n+1 entries, the
    first 0) and ``data`` (uint8). String i is ``data[offsets[i]:offsets[i+1]]``. ``mask``
    (bool, True = null) makes it nullable; a null string is stored empty.

    >>> col = StringColumn.from_strings(["a", "", "héllo"])
    >>> len(col), col[2], col.to_numpy().tolist()
    (3, 'héllo', ['a', '', 'héllo'])
    >>> StringColumn.from_strings(np.array(["x", None], dtype=object)).to_numpy().tolist()
    ['x', None]
    """

    __slots__ = ("offsets", "data", "mask")

    def __init__(self, offsets: np.ndarray, data: np.ndarray, mask: np.ndarray | None = None) -> None:
        if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0:
            raise LayoutError("StringColumn offsets must be 1-D int64 starting at 0")
        if data.dtype != np.uint8 or data.ndim != 1 or offsets[-1] != len(data):
            raise LayoutError("StringColumn data must be 1-D uint8 of length offsets[-1]")
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != (len(offsets) - 1,)):
            raise LayoutError("a StringColumn mask must be bool with one value per string")
        self.offsets = offsets
        self.data = data
        self.mask = mask

    @classmethod
    def from_strings(cls, values: Sequence[str] | np.ndarray) -> StringColumn:
        """Encodes str values (a numpy ``U``, ``T`` or object-of-str array, or a sequence of
        str) to UTF-8: numpy's fixed-width strings in one C pass, others through ``str.encode``
        (a sequence never goes through numpy's ``U``, which drops trailing NUL characters)."""
        if isinstance(values, np.ndarray) and values.dtype.kind == "U":
            return cls._from_ucs4(values)
        items = values.tolist() if isinstance(values, np.ndarray) else list(values)
        mask = None
        try:
            text = "".join(items)
        except TypeError:  # a None (a null) or a value that is not str
            mask = np.fromiter((v is None for v in items), bool, len(items))
            items = ["" if v is None else v for v in items]
            try:
                text = "".join(items)
            except TypeError as exc:  # "sequence item 3: expected str instance, int found"
                raise SchemaError(f"a string column holds a value that is neither str nor None ({exc})") from None
        try:
            if text.isascii():  # a string's bytes are its characters: one encode of the whole
                data, lengths = text.encode(), np.fromiter(map(len, items), np.int64, len(items))
            else:  # each string encoded once, for its length, then joined
                encoded = [v.encode() for v in items]
                data, lengths = b"".join(encoded), np.fromiter(map(len, encoded), np.int64, len(items))
        except UnicodeEncodeError as exc:
            raise SchemaError(f"a string column holds a code point UTF-8 cannot encode ({exc})") from None
        offsets = np.zeros(len(items) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(offsets, np.frombuffer(data, np.uint8).copy(), mask)

    @classmethod
    def _from_ucs4(cls, arr: np.ndarray) -> StringColumn:
        arr = np.ascontiguousarray(arr)
        n, width = len(arr), arr.dtype.itemsize // 4
        offsets = np.empty(n + 1, np.int64)
        codes = arr.view(np.uint32) if width else np.zeros(0, np.uint32)
        total = lib.mps_utf8_offsets_ucs4(_ptr("uint32_t[]", codes), n, width, _ptr("int64_t[]", offsets))
        if total < 0:
            raise SchemaError(f"string {-1 - total} ({arr[-1 - total]!r}) holds a code point that UTF-8 cannot "
                              f"encode (a lone surrogate)")
        data = np.empty(total, np.uint8)
        lib.mps_utf8_encode_ucs4(_ptr("uint32_t[]", codes), n, width, _ptr("int64_t[]", offsets),
                                 _ptr("uint8_t[]", data))
        return cls(offsets, data)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int | slice) -> str | None | StringColumn:
        """String i (None for a null), or a StringColumn of the rows of a slice."""
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            return self.slice(start, max(start, stop)) if step == 1 else self.take(np.arange(start, stop, step))
        if self.mask is not None and self.mask[i]:
            return None
        return bytes(self.data[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8")

    def __iter__(self) -> Iterator[str | None]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.data.nbytes + (0 if self.mask is None else self.mask.nbytes)

    def to_numpy(self) -> np.ndarray:
        """The strings as a numpy ``U`` array (an owned copy), decoded in one C pass; as an
        object array of str when a string ends with a NUL character, which ``U`` would drop."""
        n = len(self)
        offsets, data = np.ascontiguousarray(self.offsets), np.ascontiguousarray(self.data)
        ends = offsets[1:][np.diff(offsets) > 0] - 1
        if len(ends) and not data[ends].all():  # a string's last byte is 0
            strings = np.empty(n, object)
            strings[:] = [bytes(data[offsets[i] : offsets[i + 1]]).decode("utf-8") for i in range(n)]
            return strings if self.mask is None else np.ma.MaskedArray(strings, mask=self.mask.copy())
        width = max(1, lib.mps_utf8_max_chars(_ptr("int64_t[]", offsets), _ptr("uint8_t[]", data), n))
        out = np.zeros(n * width, np.uint32)
        lib.mps_utf8_decode_ucs4(_ptr("int64_t[]", offsets), _ptr("uint8_t[]", data), n, width,
                                 _ptr("uint32_t[]", out))
        strings = out.view(f"U{width}")
        return strings if self.mask is None else np.ma.MaskedArray(strings, mask=self.mask.copy())

    def copy(self) -> StringColumn:
        return StringColumn(self.offsets.copy(), self.data.copy(), None if self.mask is None else self.mask.copy())

    def take(self, indices: np.ndarray) -> StringColumn:
        """The strings at indices (int64), gathered into a new column."""
        indices = np.ascontiguousarray(indices, np.int64)
        lengths = np.diff(self.offsets)[indices]
        offsets = np.empty(len(indices) + 1, np.int64)
        data = np.empty(int(lengths.sum()), np.uint8)
        lib.mps_take_utf8(_ptr("int64_t[]", self.offsets), _ptr("uint8_t[]", self.data),
                          _ptr("int64_t[]", indices), len(indices), _ptr("int64_t[]", offsets),
                          _ptr("uint8_t[]", data))
        return StringColumn(offsets, data, None if self.mask is None else self.mask[indices])

    def slice(self, start: int, stop: int) -> StringColumn:
        """Rows start:stop; the bytes are a view, the offsets a rebased copy."""
        offsets = self.offsets[start : stop + 1]
        return StringColumn(offsets - offsets[0], self.data[offsets[0] : offsets[-1]],
                            None if self.mask is None else self.mask[start:stop])

    @staticmethod
    def concat(columns: Sequence[StringColumn]) -> StringColumn:
        """One after the other; nullable if any is."""
        if not columns:
            return StringColumn(np.zeros(1, np.int64), np.zeros(0, np.uint8))
        shifts = np.cumsum([0] + [len(c.data) for c in columns[:-1]])
        offsets = np.concatenate([[0]] + [c.offsets[1:] + shift for c, shift in zip(columns, shifts)])
        mask = None
        if any(c.mask is not None for c in columns):
            mask = np.concatenate([np.zeros(len(c), bool) if c.mask is None else c.mask for c in columns])
        return StringColumn(offsets.astype(np.int64), np.concatenate([c.data for c in columns]), mask)

    def __repr__(self) -> str:
        shown = ", ".join(repr(s) for s in list(self)[:5])
        return f"StringColumn([{shown}{', ...' if len(self) > 5 else ''}], n={len(self)})"


Column = Union[np.ndarray, StringColumn]


def null_mask(col: Column) -> np.ndarray | None:
    """True where a value is null; None for a column that is not nullable."""
    if isinstance(col, StringColumn):
        return col.mask
    if isinstance(col, np.ma.MaskedArray):
        return np.ma.getmaskarray(col)
    return None


def column_numpy(col: Column) -> np.ndarray:
    """A column as a numpy array: strings decoded to a ``U`` array (a masked one keeps nulls)."""
    return col.to_numpy() if isinstance(col, StringColumn) else col


def values_of(col: Column) -> Column:
    """A column without its null mask: the values (0 or "" where null)."""
    if isinstance(col, StringColumn):
        return col if col.mask is None else StringColumn(col.offsets, col.data)
    return np.ma.getdata(col) if isinstance(col, np.ma.MaskedArray) else col


def _nullable(values: np.ndarray, mask: np.ndarray) -> np.ma.MaskedArray:
    """A masked column whose nulls hold 0 (a fresh array when some are null)."""
    if mask.any():
        values = np.where(mask, np.zeros((), values.dtype), values)
    return np.ma.MaskedArray(values, mask=mask)


def _ptr(ctype: str, arr: np.ndarray) -> ffi.CData:
    """A C pointer to a contiguous array's data, for the duration of one C call."""
    return ffi.from_buffer(ctype, arr)


def _check_column(name: object, value: ArrayLike | StringColumn) -> Column:
    if not isinstance(name, str) or not name:
        raise SchemaError(f"column names must be non-empty str, got {name!r}")
    if isinstance(value, StringColumn):
        return value
    if isinstance(value, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(value)
        data = np.ma.getdata(value)
        if data.dtype.kind in "UTO":
            strings = np.where(mask, "", data) if data.dtype.kind != "O" else np.where(mask, None, data)
            column = _check_column(name, strings)
            mask = mask | (null_mask(column) if null_mask(column) is not None else False)
            return StringColumn(column.offsets, column.data, np.ascontiguousarray(mask))
        data = _check_column(name, data)
        return _nullable(data, np.ascontiguousarray(mask, bool))
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise BatchShapeError(f"column {name!r} has shape {arr.shape}; columns must be 1-D: ravel or split it")
    kind = arr.dtype.kind
    if kind in "UT":  # a sequence as it is: numpy's U dropped its strings' trailing NULs
        return StringColumn.from_strings(arr if isinstance(value, np.ndarray) else value)
    if kind == "O":
        try:
            return StringColumn.from_strings(arr)
        except SchemaError:
            raise SchemaError(
                f"column {name!r} is an object array of other values than str and None; mpstream carries "
                f"bool, int, uint, float32/64, datetime64, timedelta64 and str columns: convert it first, "
                f"e.g. np.asarray(values, dtype=str) or .astype(np.float64); for numbers with missing values, "
                f"np.ma.masked_invalid(values) or np.ma.MaskedArray(values, mask=...)"
            ) from None
    if kind not in _NUMERIC_KINDS or (kind == "f" and arr.dtype.itemsize not in (4, 8)):
        raise SchemaError(
            f"column {name!r} has dtype {arr.dtype}, which mpstream cannot carry; supported: bool, "
            f"int8-64, uint8-64, float32/64, datetime64, timedelta64, str"
        )
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)  # frames copy whole buffers: one memmove per column


_DTYPE_STRS: dict[np.dtype, str] = {}  # dtype -> dtype.str, which numpy builds anew at every call


def _column_dtype(col: Column) -> str:
    if type(col) is np.ndarray:  # the common case first: a plain column
        dtype = col.dtype
        name = _DTYPE_STRS.get(dtype)
        if name is None:
            name = _DTYPE_STRS[dtype] = dtype.str
        return name
    base = _STRING if isinstance(col, StringColumn) else col.dtype.str
    return base + _NULLABLE if null_mask(col) is not None else base


def _base_dtype(dtype: str) -> str:
    return dtype[:-1] if dtype.endswith(_NULLABLE) else dtype


class Batch(Mapping[str, Column]):
    """Named 1-D columns of equal length: the unit that flows between operators.

    Constructing a Batch checks every column and names the offending one: object arrays and
    unsupported dtypes raise :class:`~mpstream.errors.SchemaError` (a TypeError); columns that
    are not 1-D or differ in length raise :class:`BatchShapeError` (a ValueError). Str arrays
    (and object arrays of str) are encoded to :class:`StringColumn` once, here; a masked array
    (or None in an object array of str) makes a nullable column.

    >>> b = Batch({"key": np.array([3, 1]), "name": ["x", "yz"]})
    >>> b.num_rows, b.schema
    (2, (('key', '<i8'), ('name', 'utf8')))

    A batch read from a channel holds read-only views on shared memory that are valid only until
    its record is released; :meth:`copy` makes an owned batch that can be kept.
    """

    __slots__ = ("_columns", "_num_rows", "_schema", "_buffers")

    def __init__(self, columns: Mapping[str, ArrayLike | StringColumn]) -> None:
        checked = {name: _check_column(name, value) for name, value in columns.items()}
        lengths = {name: len(col) for name, col in checked.items()}
        if len(set(lengths.values())) > 1:
            raise BatchShapeError(f"columns differ in length (ragged batch): {lengths}; every column needs one value per row")
        self._columns = checked
        self._num_rows = next(iter(lengths.values()), 0)
        self._schema = self._buffers = None

    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def schema(self) -> tuple[tuple[str, str], ...]:
        """((name, dtype), ...) with numpy's dtype.str, or "utf8" for string columns."""
        if self._schema is None:
            self._schema = tuple([(name, _column_dtype(col)) for name, col in self._columns.items()])
        return self._schema

    def __reduce__(self) -> tuple[object, ...]:
        """Pickles as the schema and the buffers (a datetime or timedelta one as its int64
        view): pickle protocol 5 hands every one of them out of band, as a task's collected
        batches go to the coordinator, where numpy would copy a datetime64 or masked array
        into the pickle itself."""
        return _unpickle_batch, (self.schema, self._num_rows,
                                 tuple(b.view(np.int64) if b.dtype.kind in "mM" else b for b in self.buffers()))

    def buffers(self) -> tuple[np.ndarray, ...]:
        """The contiguous buffers behind the columns, in order (two per string column)."""
        if self._buffers is None:
            buffers: list[np.ndarray] = []
            for col in self._columns.values():
                buffers += _buffers(col)
            self._buffers = tuple(buffers)
        return self._buffers

    @property
    def nbytes(self) -> int:
        return sum(col.nbytes for col in self._columns.values())

    def __getitem__(self, name: str) -> Column:
        return self._columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The columns as numpy arrays, string columns decoded to ``U`` arrays (copies)."""
        return {name: column_numpy(col) for name, col in self._columns.items()}

    def take(self, indices: np.ndarray) -> Batch:
        """The rows at indices, gathered into a new (owned) batch."""
        indices = np.asarray(indices, np.int64)
        return _trusted({name: col.take(indices) for name, col in self._columns.items()}, len(indices), self._schema)

    def slice(self, start: int, stop: int) -> Batch:
        """Rows start:stop (views where possible)."""
        stop = min(stop, self._num_rows)
        cols = {name: col.slice(start, stop) if isinstance(col, StringColumn) else col[start:stop]
                for name, col in self._columns.items()}
        return _trusted(cols, max(0, stop - start), self._schema)

    def filter(self, mask: np.ndarray) -> Batch:
        """The rows where mask (bool, one per row) is true (a masked mask's nulls: false)."""
        mask = np.ma.filled(mask, False)  # a null predicate is not true (SQL's WHERE)
        if mask.dtype != np.bool_ or mask.shape != (self._num_rows,):
            raise BatchShapeError(f"a filter mask must be bool with one value per row ({self._num_rows}), "
                                  f"got {mask.dtype} of shape {mask.shape}")
        return self.take(np.flatnonzero(mask))

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """The rows of batches one after the other; all must share one schema (up to
        nullability: a column nullable in one is nullable in the result)."""
        if not batches:
            return Batch({})
        schema = batches[0].schema
        base = [(name, _base_dtype(dtype)) for name, dtype in schema]
        for b in batches:
            if b.schema != schema and [(n, _base_dtype(d)) for n, d in b.schema] != base:
                raise SchemaError(f"cannot concatenate batches of schemas {schema} and {b.schema}")
        cols: dict[str, Column] = {}
        for name, dtype in base:
            parts = [b[name] for b in batches]
            if dtype == _STRING:
                cols[name] = StringColumn.concat(parts)
            elif any(isinstance(p, np.ma.MaskedArray) for p in parts):  # nullable if any part is
                cols[name] = np.ma.MaskedArray(np.concatenate([np.ma.getdata(p) for p in parts]),
                                               mask=np.concatenate([np.ma.getmaskarray(p) for p in parts]))
            else:
                cols[name] = np.concatenate(parts)
        return _trusted(cols, sum(b.num_rows for b in batches))

    @classmethod
    def from_arrow(cls, data: object) -> Batch:
        """A batch of a ``pyarrow.Table`` or ``RecordBatch``, zero-copy where the layouts agree
        (needs pyarrow; see :mod:`mpstream.arrow`)."""
        from .arrow import from_arrow  # the Arrow interop lives there; it needs pyarrow

        return from_arrow(data)

    def to_arrow(self) -> object:
        """The batch as a ``pyarrow.Table``, zero-copy where the layouts agree (needs pyarrow;
        see :mod:`mpstream.arrow`)."""
        from .arrow import to_arrow

        return to_arrow(self)

    def copy(self) -> Batch:
        """An owned deep copy: safe to keep after the record it was read from is released."""
        return _trusted({name: col.copy() for name, col in self._columns.items()}, self._num_rows, self._schema)

    def read_only(self) -> Batch:
        """Read-only views of the columns (no copy): what an operator gets, through a ring or
        chained, so changing its input in place is an error, not a change others see. A
        batch of read-only numeric views (read from a ring, or sliced from read-only columns)
        is its own: numpy refuses to make a view writeable again when its base is not, but
        lets whoever holds an array that owns its memory do so, so those get a view."""
        for col in self._columns.values():
            if type(col) is not np.ndarray or col.flags.writeable or col.base is None:
                return _trusted({name: _read_only(col) for name, col in self._columns.items()}, self._num_rows,
                                      self._schema)
        return self

    def __repr__(self) -> str:
        cols = ", ".join(f"{name}: {dtype}" for name, dtype in self.schema)
        return f"Batch({self._num_rows} rows; {cols})"


def _trusted(columns: dict[str, Column], num_rows: int, schema: tuple | None = None) -> Batch:
    """A batch of columns that are already checked (decoded frames, a batch's own slices);
    no validation. A plain function: a frame's read makes one per record."""
    batch = _new_object(Batch)  # Batch.__new__(Batch) would look __new__ up on every call
    batch._columns, batch._num_rows, batch._schema, batch._buffers = columns, num_rows, schema, None
    return batch


def _unpickle_batch(schema: tuple[tuple[str, str], ...], num_rows: int, buffers: tuple[np.ndarray, ...]) -> Batch:
    """A batch back from what :meth:`Batch.__reduce__` pickled."""
    columns: dict[str, Column] = {}
    parts = iter(buffers)
    for name, dtype in schema:
        base, nullable = _base_dtype(dtype), dtype.endswith(_NULLABLE)
        if base == _STRING:
            columns[name] = StringColumn(next(parts), next(parts), next(parts) if nullable else None)
            continue
        values = next(parts)
        if np.dtype(base).kind in "mM":  # pickled as its int64 view
            values = values.view(base)
        columns[name] = np.ma.MaskedArray(values, mask=next(parts)) if nullable else values
    if next(parts, None) is not None or any(len(col) != num_rows for col in columns.values()):
        raise LayoutError(f"a pickled batch of schema {schema} does not hold {num_rows} rows in its buffers")
    return _trusted(columns, num_rows)  # the schema of what came back (numpy may change byte order)


def _view(array: np.ndarray) -> np.ndarray:
    view = array.view(np.ndarray)
    view.flags.writeable = False
    return view


def _read_only(col: Column) -> Column:
    if isinstance(col, StringColumn):
        return StringColumn(_view(col.offsets), _view(col.data), None if col.mask is None else _view(col.mask))
    mask = null_mask(col)
    return _view(col) if mask is None else np.ma.MaskedArray(_view(np.ma.getdata(col)), mask=_view(mask), copy=False)


def _buffers(col: Column) -> tuple[np.ndarray, ...]:
    # The common case first: a plain column. (np.ma.getdata of a plain array would cost an
    # AttributeError: every batch written paid it.)
    if type(col) is np.ndarray:
        return (col,)
    if isinstance(col, StringColumn):
        return (col.offsets, col.data) if col.mask is None else (col.offsets, col.data, col.mask)
    if isinstance(col, np.ma.MaskedArray):
        return np.ma.getdata(col), np.ma.getmaskarray(col)
    return (col,)


class Frame:
    """Encodes batches of one schema into DATA payloads and decodes them back.

    ``skew`` is the payload's distance past a 64-byte boundary (the ring's record header), so
    buffer offsets are chosen to land on 64-byte boundaries of the ring itself. A frame is
    given ``src``, the whole mapped segment (a reader's read-only, a writer's writable): every
    buffer of a payload at a 64-byte-aligned ``index - skew`` is aligned for its dtype, so
    :meth:`read` slices it out of a view of the whole segment of that dtype, made once,
    instead of paying a ``np.frombuffer`` per column, and :meth:`write_rows` gathers rows
    straight into such a slice.
    """

    __slots__ = ("schema", "_columns", "_header", "_skew", "_layouts", "_src", "_plan", "_buffer_views")

    def __init__(self, schema: tuple[tuple[str, str], ...], skew: int, src: memoryview | None = None) -> None:
        self.schema = schema
        self._columns = [(name, None if _base_dtype(dtype) == _STRING else np.dtype(_base_dtype(dtype)),
                          dtype.endswith(_NULLABLE)) for name, dtype in schema]
        nbuffers = sum((2 if dtype is None else 1) + nullable for _, dtype, nullable in self._columns)
        self._header = struct.Struct(f"<Q{2 * nbuffers}Q")
        self._skew = skew
        # Without string columns a layout depends on the row count alone: memoize it.
        fixed_width = all(dtype is not None for _, dtype, _ in self._columns)
        self._layouts: dict[int, tuple[int, bytes, tuple[tuple[int, int], ...]]] | None = {} if fixed_width else None
        self._src = src
        self._plan = [] if src is None else self._read_plan(src)
        # per buffer of a fixed-width frame: (the segment as its dtype, itemsize), for write_rows
        self._buffer_views = [] if self._layouts is None else [
            (view, view.itemsize) for _, values, _, _, masks, _ in self._plan
            for view in ((values,) if masks is None else (values, masks))]

    def _read_plan(self, src: memoryview) -> list[tuple[str, np.ndarray, int, int, np.ndarray | None,
                                                        np.ndarray | None]]:
        """Per column: (name, the whole segment as its values' dtype (int64 offsets for
        strings), itemsize, index of its first header field, the segment as a bool mask (None
        when not nullable), the segment as uint8 string bytes (None when not a string))."""
        views: dict[np.dtype, np.ndarray] = {}

        def view(dtype: np.dtype) -> np.ndarray:
            if dtype not in views:
                views[dtype] = np.frombuffer(src, dtype)
            return views[dtype]

        plan, f = [], 1
        for name, dtype, nullable in self._columns:
            values = view(_INT64 if dtype is None else dtype)
            plan.append((name, values, values.itemsize, f, view(_BOOL) if nullable else None,
                         view(_UINT8) if dtype is None else None))
            f += (4 if dtype is None else 2) + 2 * nullable
        return plan

    def encode_schema(self) -> bytes:
        return json.dumps({"columns": [list(c) for c in self.schema]}).encode()

    @classmethod
    def decode_schema(cls, payload: bytes, skew: int, src: memoryview) -> Frame:
        """The frame of a SCHEMA record, decoding the DATA records of segment src."""
        try:
            columns = json.loads(payload.decode())["columns"]
            return cls(tuple((str(name), str(dtype)) for name, dtype in columns), skew, src)
        except (ValueError, KeyError, TypeError) as exc:
            raise LayoutError(f"malformed SCHEMA record: {exc}") from exc

    @property
    def fixed_width(self) -> bool:
        """No string column: a layout depends on the row count alone."""
        return self._layouts is not None

    def layout(self, batch: Batch) -> tuple[int, bytes, tuple[tuple[int, int], ...]]:
        """(payload length, header bytes, each buffer's (offset, nbytes) in the payload) of
        batch in this frame."""
        layouts = self._layouts
        if layouts is None:
            return self._place(batch._num_rows, [buf.nbytes for buf in batch.buffers()])
        known = layouts.get(batch._num_rows)
        return known if known is not None else self.layout_rows(batch._num_rows)

    def layout_rows(self, num_rows: int) -> tuple[int, bytes, tuple[tuple[int, int], ...]]:
        """The layout of num_rows rows in a fixed-width frame (memoized)."""
        layouts = self._layouts
        if (known := layouts.get(num_rows)) is not None:
            return known
        sizes = []
        for _, dtype, nullable in self._columns:
            sizes += (num_rows * dtype.itemsize, num_rows) if nullable else (num_rows * dtype.itemsize,)
        layout = self._place(num_rows, sizes)
        if len(layouts) < 256:
            layouts[num_rows] = layout
        return layout

    def _place(self, num_rows: int, sizes: list[int]) -> tuple[int, bytes, tuple[tuple[int, int], ...]]:
        """The layout of buffers of these sizes, each on a 64-byte boundary of the ring."""
        fields = [num_rows]
        places = []
        position = self._header.size
        skew = self._skew
        for nbytes in sizes:
            position += -(position + skew) % BUFFER_ALIGNMENT
            fields += (position, nbytes)
            places.append((position, nbytes))
            position += nbytes
        return position, self._header.pack(*fields), tuple(places)

    @staticmethod
    def write(base: ffi.CData, index: int, places: tuple[tuple[int, int], ...], batch: Batch) -> None:
        """Writes batch's buffers at their places (a layout's third item) in the payload at
        index of the segment at base; one memmove per buffer, straight into the ring. The
        header (the layout's second item) is the caller's to write."""
        for (offset, nbytes), buf in zip(places, batch.buffers()):
            if nbytes:
                ffi.memmove(base + (index + offset), buf, nbytes)

    def write_rows(self, index: int, places: tuple[tuple[int, int], ...], batch: Batch, rows: np.ndarray) -> None:
        """Writes the buffers of ``batch.take(rows)`` (rows: int64 indices into batch) at their
        places in the payload at index without making it: every buffer's rows are gathered
        straight into the ring (a fixed-width frame of a writer's segment). The header is the
        caller's to write."""
        n = len(rows)
        for (offset, _), buf, (view, itemsize) in zip(places, batch.buffers(), self._buffer_views):
            start = (index + offset) // itemsize
            np.take(buf, rows, out=view[start : start + n], mode="clip")  # clip: unbuffered; rows are in range

    def read(self, index: int) -> Batch:
        """Decodes the DATA payload at index of the segment into a batch of read-only views.
        Raises LayoutError for a header whose buffers are misplaced (not aligned for their
        dtype, or past the segment's end): a corrupt record, never garbage columns."""
        fields = self._header.unpack_from(self._src, index)
        num_rows = fields[0]
        columns: dict[str, Column] = {}
        for name, view, itemsize, f, masks, data in self._plan:
            if data is None:  # the common case, inline: what cut() does
                offset = index + fields[f]
                start = offset // itemsize
                values = view[start : start + num_rows]
                if start * itemsize != offset or len(values) != num_rows:
                    self._cut(name, view, itemsize, offset, num_rows)  # raises, saying what is wrong
                if masks is not None:
                    values = np.ma.MaskedArray(values, mask=self._cut(name, masks, 1, index + fields[f + 2], num_rows))
                columns[name] = values
            else:
                cut = self._cut
                column = StringColumn.__new__(StringColumn)  # written by Frame.write: valid
                column.offsets = cut(name, view, 8, index + fields[f], num_rows + 1)
                column.data = cut(name, data, 1, index + fields[f + 2], fields[f + 3])
                column.mask = None if masks is None else cut(name, masks, 1, index + fields[f + 4], num_rows)
                columns[name] = column
        return _trusted(columns, num_rows, self.schema)

    @staticmethod
    def _cut(name: str, view: np.ndarray, itemsize: int, offset: int, count: int) -> np.ndarray:
        """count items of view (the whole segment) from byte offset; checks the header's word."""
        start = offset // itemsize
        values = view[start : start + count]
        if start * itemsize != offset or len(values) != count:
            raise LayoutError(f"column {name!r}: a DATA record's header puts {count} items of {view.dtype} at byte "
                              f"{offset} of a {view.nbytes}-byte segment, {'past its end' if start * itemsize == offset else 'unaligned'}: "
                              f"the record is corrupt (or its writer runs another mpstream version)")
        return values
