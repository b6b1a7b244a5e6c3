"""Every exception mpstream raises. Each message names the operator, column or channel involved
and says what to do about it.

``MpstreamError`` is the root. Errors a caller can fix in its own arguments also derive from
``ValueError`` or ``TypeError``, so code that catches those keeps working.
"""


class MpstreamError(Exception):
    """Base class of every mpstream error."""


# ---- building a job ------------------------------------------------------------------------

class PlanError(MpstreamError, ValueError):
    """A pipeline cannot be built or run as described: a bad name, parallelism, argument or
    combination of options. Raised when the plan is built, before any process starts."""


class SchemaError(MpstreamError, TypeError):
    """A column has a dtype mpstream cannot carry (object, complex, ...)."""


class BatchShapeError(SchemaError, ValueError):
    """Columns that are not 1-D, or not all of one length."""


class AggregateError(MpstreamError, ValueError):
    """An aggregation spec or its input columns do not fit together."""


class PartitionError(MpstreamError, ValueError):
    """A partitioner produced ids out of range, or its key column is unusable."""


class WindowError(MpstreamError, ValueError):
    """A row's event time cannot be placed in a window (its window would start below the
    smallest int64)."""


class SourceError(MpstreamError, ValueError):
    """A source's input is malformed (a ragged CSV row, a value that does not fit its column)
    or a source returned something that is not a batch."""


# ---- running a job -------------------------------------------------------------------------

class OperatorError(MpstreamError):
    """An operator raised; the message names it and carries the worker's traceback."""


class RestoreError(OperatorError):
    """An operator could not take its state back from a checkpoint (its files changed, its
    state does not fit it any more): the same checkpoint would fail again, so the job stops at
    once instead of restarting."""


class WorkerDiedError(MpstreamError):
    """A worker process died without reporting (killed by a signal, or exited)."""


class CheckpointError(MpstreamError):
    """A checkpoint could not be written, or none can be restored."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint of another format version: never skipped as damaged (a resume would start
    over without it); restore it with the mpstream version that wrote it."""


# ---- channels ------------------------------------------------------------------------------

class ChannelError(MpstreamError):
    """A shared-memory channel failed."""


class PeerDiedError(ChannelError):
    """The process on the other side of a channel exited while this side waited on it."""


class ChannelClosedError(ChannelError):
    """The consumer closed its end: nothing written now would be read."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """A blocking read or write waited its whole timeout."""


class SharedMemoryFullError(ChannelError, OSError):
    """/dev/shm has no room for a new channel segment."""


class LayoutError(ChannelError):
    """A segment is not an mpstream ring of this layout version, or a record is malformed."""


class RecordTooLargeError(ChannelError, ValueError):
    """A record does not fit in the channel's ring (its limit is about half the capacity)."""
