"""Redis Streams: a replayable log source and an exactly-once sink (the ``redis`` extra).

**Source.** Like a Kafka consumer, it pulls: every poll asks Redis (``XREAD``, without
blocking) for the entries after its own position, the last id it read per stream. Streams are
spread over the instances (stream i goes to instance i mod p; an instance without a stream is
idle from the start). The position is in the source's snapshot, so a restore reads again from
the last checkpoint's ids; no consumer group is used, nothing is acknowledged in Redis. When a
stream is quiet the task polls again after a back-off (1 ms doubling to 50 ms): it sleeps, it
does not spin. ``until="latest"`` makes a bounded run: each stream is read up to the entry
that was its last when the job started (kept in the snapshot, so a restore ends at the same
place). A lost connection is retried with back-off for ``retry_s`` seconds, then the job fails
with an error naming the server.

Entries become rows: one column per field (str, or the type ``schema`` gives; bools read
true/false/1/0), null where an entry lacks the field (or, for a typed field, has it empty);
``id_column`` adds each entry's id. The columns are fixed by the first entries read (the
fields of ``schema`` in its order, then the others by name) and kept in the checkpoint; a
field that comes later is an error asking to declare it in ``schema``.

**Sink.** Exactly-once by a transaction at checkpoint commit: the rows of an epoch (between
two barriers) are kept, in memory and in the checkpoint, and when the checkpoint that closes
the epoch commits they are appended (``XADD``, ids chosen by Redis) in one ``MULTI``/``EXEC``
that also sets a marker key, ``mpstream:{stream}:{sink}:{instance}``, to ``{run}:{epoch}`` (a
run: an id the sink instance draws when the job starts, kept in its checkpoints). After a
restore, an epoch that the marker says its run wrote is not written again; a new run of the
job (not resumed) writes everything. So entries appear once,
one checkpoint interval after they were made. (Ids derived from the position would need every
instance to write strictly increasing ids into one stream: they cannot.) Without checkpoints,
each batch is appended as it comes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batch import Batch, StringColumn, column_numpy, null_mask, values_of
from .errors import SourceError
from .operators import Context, Operator, Output
from .sources import Source

__all__ = ["RedisStreamSource", "RedisStreamSink", "redis_or_error"]

BACKOFF_S = (0.01, 1.0)  # reconnection back-off: first and largest wait


def redis_or_error(feature: str) -> Any:
    """The redis module (redis-py), or an ImportError saying what needs it."""
    try:
        import redis
    except ImportError:
        raise ImportError(f"{feature} needs redis-py: pip install 'mpstream[redis]'") from None
    return redis


class _Connection:
    """A client that retries a lost connection with back-off for ``retry_s`` seconds."""

    def __init__(self, url: str, retry_s: float, where: str) -> None:
        self.redis = redis_or_error(where)
        self.url, self.retry_s, self.where = url, retry_s, where
        self.client = self.redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.down_since: float | None = None
        self.wait = BACKOFF_S[0]

    def call(self, fn: Any) -> Any:
        """fn(client), retried after a lost connection; None while the server is away (the
        caller tries again later), an error once it has been away retry_s seconds."""
        try:
            out = fn(self.client)
        except (self.redis.ConnectionError, self.redis.TimeoutError) as exc:
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = now  # the first wait is BACKOFF_S[0], then it doubles
            else:
                self.wait = min(self.wait * 2, BACKOFF_S[1])
            if now - self.down_since > self.retry_s:
                raise SourceError(f"{self.where}: Redis at {self.url} unreachable for {self.retry_s:g} s ({exc}); "
                                  f"start it, or raise retry_s") from None
            return None
        self.down_since, self.wait = None, BACKOFF_S[0]
        return out

    def call_until_done(self, fn: Any) -> Any:
        """fn(client), waiting out a lost connection (for operations that cannot be put off)."""
        while True:
            out = self.call(fn)
            if out is not None:
                return out
            time.sleep(self.wait)


class RedisStreamSource(Source):
    """Reads Redis streams by entry id (see the module doc). Rescalable: restored at another
    parallelism, each instance takes the positions of the streams it now reads."""

    rescalable = True

    def __init__(self, url: str, streams: Sequence[str], batch_size: int = 10_000, until: str | None = None,
                 schema: Mapping[str, Any] | None = None, id_column: str | None = None, start: str = "0-0",
                 retry_s: float = 30.0) -> None:
        if until not in (None, "latest"):
            raise ValueError(f"until must be None (unbounded) or 'latest', got {until!r}")
        self.url, self.streams, self.batch_size, self.until = url, list(streams), batch_size, until
        self.schema, self.id_column, self.start, self.retry_s = dict(schema or {}), id_column, start, retry_s

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.mine = self.streams[ctx.instance :: ctx.parallelism]
        self.conn = _Connection(self.url, self.retry_s, f"source {ctx.name!r}")
        self.position = dict.fromkeys(self.mine, self.start)
        self.end: dict[str, str] | None = None
        if self.until == "latest":
            self.end = {s: self._last_id(s) for s in self.mine}
        self.due = 0.0
        self.columns: list[str] | None = None  # fixed by the first entries read

    def _last_id(self, stream: str) -> str:
        last = self.conn.call_until_done(lambda r: r.xrevrange(stream, count=1) or [(b"0-0", {})])
        return last[0][0].decode()

    def has_input(self) -> bool:
        return bool(self.mine)

    def poll(self) -> Output:
        wanted = {s: p for s, p in self.position.items() if self.end is None or _before(p, self.end[s])}
        if not wanted:
            raise StopIteration  # bounded: every stream read up to its end
        reply = self.conn.call(lambda r: r.xread(wanted, count=self.batch_size))
        if reply is None:  # the server is away: try again after the back-off
            self.due = time.time() + self.conn.wait
            return None
        entries = []
        for stream, items in reply:
            stream = stream.decode()
            for entry_id, fields in items:
                entry_id = entry_id.decode()
                if self.end is not None and not _before(self.position[stream], self.end[stream]):
                    break
                if self.end is not None and _before(self.end[stream], entry_id):
                    self.position[stream] = self.end[stream]
                    break
                entries.append((entry_id, fields))
                self.position[stream] = entry_id
        if not entries:
            self.due = 0.0
            return None
        return self._rows(entries)

    def next_awake(self) -> float | None:
        return self.due or None

    def _rows(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> Batch:
        fields = {k.decode() for _, entry in entries for k in entry}
        if self.columns is None:  # fixed by the first entries: the schema's fields, then the others by name
            self.columns = list(self.schema) + sorted(fields - set(self.schema))
        unknown = sorted(fields - set(self.columns))
        if unknown:
            raise SourceError(f"source {self.ctx.name!r}: Redis entries bring field {unknown[0]!r}, which the first "
                              f"entries did not have (the columns are {self.columns}); declare every field with "
                              f"schema=, e.g. schema={{{unknown[0]!r}: 'str'}}")
        columns: dict[str, Any] = {}
        for name in self.columns:
            key = name.encode()
            columns[name] = self._typed(name, [entry.get(key) for _, entry in entries])
        if self.id_column is not None:
            columns[self.id_column] = np.array([entry_id for entry_id, _ in entries])
        return Batch(columns)

    def _typed(self, name: str, raw: list[bytes | None]) -> Any:
        """A field's values as its column: str (a missing field is null), or the schema's type
        (an empty value is null too, as in CSV)."""
        typ = self.schema.get(name, "str")
        if typ in ("str", "string", "utf8"):
            return StringColumn.from_strings([None if v is None else v.decode() for v in raw])  # None: null
        missing = np.fromiter((not v for v in raw), bool, len(raw))
        text = [v if v else b"0" for v in raw]
        dtype = np.dtype(typ)
        try:
            if dtype == np.bool_:
                words = {b"true": True, b"1": True, b"false": False, b"0": False}
                values = np.array([words[v.lower()] for v in text], bool)
            else:
                values = np.array(text).astype(dtype)
        except (ValueError, TypeError, KeyError) as exc:
            raise SourceError(f"source {self.ctx.name!r}: field {name!r} of a Redis entry does not read as {typ} "
                              f"({exc!r}); fix the schema= given") from None
        return np.ma.MaskedArray(values, mask=missing) if missing.any() else values

    def snapshot(self) -> Any:
        return {"position": dict(self.position), "end": self.end, "columns": self.columns}

    def restore(self, states: list[Any]) -> None:
        for state in states:  # after a rescale, this instance's streams may come from several
            self.columns = self.columns or state["columns"]
            self.position.update({s: p for s, p in state["position"].items() if s in self.position})
            if state["end"] is not None and self.end is not None:
                self.end.update({s: e for s, e in state["end"].items() if s in self.position})


def _before(a: str, b: str) -> bool:
    """Stream id a comes before b ("ms-seq" compared as numbers)."""
    return tuple(map(int, a.split("-"))) < tuple(map(int, b.split("-")))


class RedisStreamSink(Operator):
    """Appends rows to a Redis stream, exactly once (see the module doc): a row's fields are
    its columns (as text; a null field is left out). Rescalable: restored at another
    parallelism, the epochs of every old instance are written (each under its own marker) by
    the first new one."""

    commits_on_checkpoint = True
    rescalable = True

    def __init__(self, url: str, stream: str, retry_s: float = 30.0) -> None:
        self.url, self.stream, self.retry_s = url, stream, retry_s

    def open(self, ctx: Context) -> None:
        super().open(ctx)
        self.conn = _Connection(self.url, self.retry_s, f"sink {ctx.name!r}")
        self.marker = f"mpstream:{self.stream}:{ctx.name}:{ctx.instance}"
        self.run = uuid.uuid4().hex  # epochs count again in every run: the marker names its run
        self.epoch = 0
        self.rows: list[Batch] = []  # this epoch's
        self.sealed: list[SealedEpoch] = []

    def process(self, batch: Batch) -> Output:
        if not self.ctx.checkpointing:
            self._append([batch], None)
        elif batch.num_rows:
            self.rows.append(batch.copy())
        return None

    def _append(self, batches: list[Batch], epoch: int | None, marker: str | None = None,
                run: str | None = None) -> None:
        """One transaction: the rows, and the marker "{run}:{epoch}" (skipped when the marker
        says this run wrote this epoch already)."""
        entries = [entry for b in batches for entry in _entries(b)]
        marker, run = marker or self.marker, run or self.run

        def write(client: Any) -> bool:
            if epoch is not None:
                done = client.get(marker)
                if done is not None:
                    done_run, done_epoch = done.decode().rsplit(":", 1)
                    if done_run == run and int(done_epoch) >= epoch:
                        return True  # written before a restore
            with client.pipeline(transaction=True) as tx:
                for fields in entries:
                    tx.xadd(self.stream, fields)
                if epoch is not None:
                    tx.set(marker, f"{run}:{epoch}")
                tx.execute()
            return True

        self.conn.call_until_done(write)

    def prepare_snapshot_pre_barrier(self, checkpoint_id: int) -> Output:
        if self.rows:
            self.sealed.append(SealedEpoch(self.epoch, checkpoint_id, self.rows))
        self.rows, self.epoch = [], checkpoint_id
        return None

    def snapshot(self) -> Any:
        return {"sealed": list(self.sealed), "epoch": self.epoch, "marker": self.marker, "run": self.run}

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        for sealed in [s for s in self.sealed if s.checkpoint <= checkpoint_id]:
            self._append(sealed.rows, sealed.epoch + 1)  # marker: epochs written, counted from 1
            self.sealed.remove(sealed)

    def restore(self, states: list[Any]) -> None:
        for state in states:  # after a rescale, every old instance's: written by instance 0
            if not self.ctx.rescaled or self.ctx.instance == 0:
                for sealed in state["sealed"]:  # committed: written unless its run's marker says so
                    self._append(sealed.rows, sealed.epoch + 1, state["marker"], state["run"])
            self.epoch = max(self.epoch, state["epoch"])

    def close(self) -> Output:
        return None


@dataclass
class SealedEpoch:
    """The rows of one epoch of a sink instance, sealed by a checkpoint: written when it commits."""

    epoch: int
    checkpoint: int
    rows: list[Batch]


def _entries(batch: Batch) -> list[dict[str, Any]]:
    """A Redis entry (field -> text) per row; a null field is left out."""
    columns = []
    for name in batch:
        column = batch[name]
        nulls = null_mask(column)
        values = column_numpy(values_of(column))
        columns.append((name, values.astype(str).tolist(), None if nulls is None else nulls.tolist()))
    return [{name: values[i] for name, values, nulls in columns if nulls is None or not nulls[i]}
            for i in range(batch.num_rows)]
