"""mpstream: columnar stream and batch pipelines, one OS process per operator, batches moving
through shared-memory rings with credit-based backpressure, barrier-aligned checkpoints.

The pipeline API is :class:`Pipeline` (see :mod:`mpstream.pipeline`); the data plane is
:class:`Channel`, :class:`ChannelWriter`, :class:`ChannelReader` and :class:`InputGate`.
"""

from .batch import Batch, BatchShapeError, StringColumn
from .channel import Channel, ChannelReader, ChannelWriter, InputGate, Record, RecordKind, sweep_stale_segments
from .checkpoint import CheckpointError
from .errors import (
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    LayoutError,
    MpstreamError,
    PeerDiedError,
    RecordTooLargeError,
    SchemaError,
    SharedMemoryFullError,
)
from .operators import Context, KeyedOperator, KeyedState, Operator, Source
from .pipeline import Pipeline
from .runtime import JobResult, OperatorError, WorkerDiedError

__all__ = [
    "Batch", "BatchShapeError", "StringColumn",
    "Channel", "ChannelReader", "ChannelWriter", "InputGate", "Record", "RecordKind", "sweep_stale_segments",
    "Pipeline", "JobResult", "Context", "Operator", "KeyedOperator", "KeyedState", "Source",
    "CheckpointError", "ChannelClosedError", "ChannelError", "ChannelTimeoutError", "LayoutError", "MpstreamError",
    "OperatorError", "PeerDiedError", "RecordTooLargeError", "SchemaError", "SharedMemoryFullError",
    "WorkerDiedError",
]
