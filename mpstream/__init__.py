"""mpstream: columnar stream and batch pipelines, one OS process per operator, batches moving
through shared-memory rings with credit-based backpressure."""

from .batch import Batch, BatchShapeError, StringColumn
from .channel import Channel, ChannelReader, ChannelWriter, InputGate, Record, RecordKind, sweep_stale_segments
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

__all__ = [
    "Batch", "BatchShapeError", "StringColumn",
    "Channel", "ChannelReader", "ChannelWriter", "InputGate", "Record", "RecordKind", "sweep_stale_segments",
    "ChannelClosedError", "ChannelError", "ChannelTimeoutError", "LayoutError", "MpstreamError",
    "PeerDiedError", "RecordTooLargeError", "SchemaError", "SharedMemoryFullError",
]
