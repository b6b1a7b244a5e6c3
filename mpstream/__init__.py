"""mpstream: columnar stream and batch pipelines, one OS process per operator, batches moving
through shared-memory rings with credit-based backpressure, barrier-aligned checkpoints.

The pipeline API is :class:`Pipeline` (see :mod:`mpstream.pipeline`); the data plane is
:class:`Channel`, :class:`ChannelWriter`, :class:`ChannelReader` and :class:`InputGate`.

The names below are imported on first use, so importing one module (``mpstream.plan``, say)
does not import the rest of the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "batch": ("Batch", "StringColumn"),
    "channel": ("Channel", "ChannelReader", "ChannelWriter", "InputGate", "Record", "RecordKind",
                "sweep_stale_segments"),
    "errors": ("AggregateError", "BatchShapeError", "ChannelClosedError", "ChannelError", "ChannelTimeoutError",
               "CheckpointError", "LayoutError", "MpstreamError", "OperatorError", "PartitionError", "PeerDiedError",
               "PlanError", "RecordTooLargeError", "RestoreError", "SchemaError", "SharedMemoryFullError", "SourceError",
               "WindowError", "WorkerDiedError"),
    "operators": ("Context", "KeyedOperator", "Operator"),
    "sources": ("OffsetSource", "Source"),
    "state": ("KeyedState",),
    "pipeline": ("Pipeline", "Stream", "KeyedStream"),
    "coordinator": ("JobHandle",),
    "result": ("JobResult",),
    "metrics": ("InstanceStats",),
    "timers": ("Timer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mpstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
