"""Arrow interop: :class:`~mpstream.batch.Batch` <-> ``pyarrow.Table`` / ``RecordBatch``.

pyarrow is an optional extra (``pip install mpstream[arrow]``); :func:`pyarrow_or_error` says
so when a feature needs it and it is missing.

Zero-copy, both ways, for the buffers of numeric, timestamp, date64, duration and
``large_string`` columns of one chunk without nulls: the numpy arrays and StringColumns are
views on Arrow's buffers, and the other way round. Copied: a ``string`` column's int32 offsets
(widened to int64 once), booleans (Arrow packs them in bits, numpy gives each a byte), date32
(int32 days to datetime64[D]), a column of several chunks (combined), and a column with nulls
(mpstream stores a null's value as 0 or "", so that nulls hash and group together; Arrow leaves
it undefined). Dictionary-encoded columns are decoded. Other types (nested, decimal, binary,
float16, a column of type null...) are an error naming the column and the type.

>>> import numpy as np
>>> from mpstream.batch import Batch
>>> b = Batch({"k": np.array([1, 2]), "s": np.array(["a", None], dtype=object)})
>>> t = to_arrow(b)
>>> t.column("s").to_pylist(), from_arrow(t)["k"].tolist()
(['a', None], [1, 2])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .batch import Batch, Column, StringColumn, _nullable, null_mask, values_of
from .errors import SchemaError

__all__ = ["from_arrow", "to_arrow", "pyarrow_or_error"]

_TIME_UNITS = ("s", "ms", "us", "ns")


def pyarrow_or_error(feature: str) -> Any:
    """The pyarrow module, or an ImportError saying what needs it and how to install it."""
    try:
        import pyarrow
    except ImportError:
        raise ImportError(f"{feature} needs pyarrow: pip install 'mpstream[arrow]'") from None
    return pyarrow


def from_arrow(data: Any) -> Batch:
    """A batch of a ``pyarrow.Table`` or ``RecordBatch`` (see the module doc)."""
    pa = pyarrow_or_error("Batch.from_arrow")
    if isinstance(data, pa.Table):
        columns = {name: _array(name, col.combine_chunks() if col.num_chunks != 1 else col.chunk(0))
                   for name, col in zip(data.column_names, data.columns)}
    elif isinstance(data, pa.RecordBatch):
        columns = {name: _array(name, col) for name, col in zip(data.schema.names, data.columns)}
    else:
        raise TypeError(f"from_arrow takes a pyarrow Table or RecordBatch, got {type(data).__name__}")
    if len(set(columns)) != data.num_columns:
        raise SchemaError(f"an Arrow table with duplicate column names: {data.column_names}")
    return Batch(columns) if columns else Batch({})


def _array(name: str, arr: Any) -> Column:
    import pyarrow.types as t

    if t.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    typ = arr.type
    n, offset = len(arr), arr.offset
    buffers = arr.buffers()
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    if t.is_large_string(typ) or t.is_string(typ):
        width = np.int64 if t.is_large_string(typ) else np.int32
        offsets = np.frombuffer(buffers[1], width, n + 1, offset * np.dtype(width).itemsize)
        data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
        first = int(offsets[0])
        data = data[first : int(offsets[-1])]
        if first or width is np.int32:
            offsets = offsets.astype(np.int64) - first
        if nulls is not None:
            lengths = np.diff(offsets)
            if lengths[nulls].any():  # a null with bytes behind it: stored empty here
                data = data[np.repeat(~nulls, lengths)]
                offsets = np.concatenate([[0], np.cumsum(np.where(nulls, 0, lengths))]).astype(np.int64)
        return StringColumn(offsets, data, nulls)
    dtype = _numpy_dtype(name, typ)
    if t.is_boolean(typ):
        values = arr.fill_null(False).to_numpy(zero_copy_only=False) if nulls is not None else \
            arr.to_numpy(zero_copy_only=False)
    elif t.is_date32(typ):
        values = np.frombuffer(buffers[1], np.int32, n, offset * 4).astype(np.int64).view(dtype)
    else:
        values = np.frombuffer(buffers[1], dtype, n, offset * dtype.itemsize)
    if nulls is None:
        return values
    return _nullable(values, nulls)


def _numpy_dtype(name: str, typ: Any) -> np.dtype:
    import pyarrow.types as t

    if t.is_boolean(typ):
        return np.dtype(np.bool_)
    if (t.is_integer(typ) or t.is_floating(typ)) and not t.is_float16(typ):
        return np.dtype(typ.to_pandas_dtype())
    if t.is_timestamp(typ):
        return np.dtype(f"datetime64[{typ.unit}]")  # a time zone's instants are UTC, as Arrow stores them
    if t.is_date32(typ):
        return np.dtype("datetime64[D]")
    if t.is_date64(typ):
        return np.dtype("datetime64[ms]")
    if t.is_duration(typ):
        return np.dtype(f"timedelta64[{typ.unit}]")
    raise SchemaError(f"column {name!r} has Arrow type {typ}, which mpstream cannot carry; supported: bool, "
                      f"int8-64, uint8-64, float32/64, timestamp, date32/64, duration, string, large_string, and "
                      f"dictionaries of those: cast it first (e.g. table.cast(...))")


def to_arrow(batch: Batch) -> Any:
    """A ``pyarrow.Table`` of a batch (see the module doc); strings as ``large_string``."""
    pa = pyarrow_or_error("Batch.to_arrow")
    arrays = [_to_array(pa, name, batch[name]) for name in batch]
    return pa.Table.from_arrays(arrays, names=list(batch)) if arrays else pa.table({})


def _to_array(pa: Any, name: str, column: Column) -> Any:
    mask = null_mask(column)
    values = values_of(column)
    if not isinstance(values, StringColumn) and values.dtype.kind in "mM":
        nat = np.isnat(values)  # numpy's "not a time" is Arrow's null
        mask = nat if mask is None else mask | nat
    validity = None
    if mask is not None and mask.any():
        validity = pa.py_buffer(np.packbits(~mask, bitorder="little"))
    n = len(values)
    if isinstance(values, StringColumn):
        return pa.Array.from_buffers(pa.large_string(), n, [validity, pa.py_buffer(values.offsets),
                                                            pa.py_buffer(values.data)])
    kind = values.dtype.kind
    if kind == "b":
        return pa.Array.from_buffers(pa.bool_(), n, [validity, pa.py_buffer(np.packbits(values, bitorder="little"))])
    if kind in "mM":
        unit = np.datetime_data(values.dtype)[0]
        if unit == "D" and kind == "M":
            return pa.Array.from_buffers(pa.date32(), n, [validity, pa.py_buffer(values.view(np.int64).astype(np.int32))])
        if unit not in _TIME_UNITS:
            raise SchemaError(f"column {name!r}: Arrow has no {values.dtype} (units s, ms, us, ns, and days for dates)")
        typ = pa.timestamp(unit) if kind == "M" else pa.duration(unit)
        return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(values.view(np.int64))])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), n, [validity, pa.py_buffer(values)])
