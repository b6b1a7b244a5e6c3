"""``run(metrics_port=P)``: the job's counters in the Prometheus text format at
``http://127.0.0.1:P/metrics``, served by prometheus-client (``pip install 'mpstream[metrics]'``)
from a thread of the coordinator's process. Every scrape copies the counters board
(:mod:`mpstream.counters`): the workers are not asked for anything.

Metrics (labels ``operator`` and ``instance``; the times are the instance's process's, shared
by operators chained in it):

=========================================  =========  ==============================================
``mpstream_records_in_total``              counter    records the operator instance took in
``mpstream_records_out_total``             counter    records it emitted
``mpstream_batches_in_total``              counter    batches it took in
``mpstream_batches_out_total``             counter    batches it emitted
``mpstream_bytes_out_total``               counter    bytes it wrote to channels
``mpstream_dropped_records_total``         counter    records shed by a drop-policy output
``mpstream_late_records_total``            counter    records a window dropped as too late
``mpstream_busy_seconds_total``            counter    its process's time neither idle nor backpressured
``mpstream_idle_seconds_total``            counter    time waiting for input
``mpstream_backpressured_seconds_total``   counter    time waiting for credit on an output
``mpstream_input_fill_ratio``              gauge      the fullest input ring of its process, 0 to 1
``mpstream_watermark``                     gauge      its event time (where it has one)
``mpstream_checkpoints_total``             counter    checkpoints completed (no labels)
``mpstream_last_checkpoint_duration_seconds``  gauge  the last one's duration
``mpstream_last_checkpoint_timestamp_seconds`` gauge  when it completed (unix time)
``mpstream_restarts_total``                counter    restarts from a checkpoint after a failure
=========================================  =========  ==============================================

A restarted task counts from zero again: Prometheus's ``rate()`` treats that as a counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .counters import JobCounters, OperatorCounters
from .errors import PlanError

__all__ = ["MetricsServer"]

_COUNTERS: list[tuple[str, str, Callable[[OperatorCounters], float]]] = [
    ("records_in", "Records the operator instance took in.", lambda o: o.records_in),
    ("records_out", "Records the operator instance emitted.", lambda o: o.records_out),
    ("batches_in", "Batches the operator instance took in.", lambda o: o.batches_in),
    ("batches_out", "Batches the operator instance emitted.", lambda o: o.batches_out),
    ("bytes_out", "Bytes the operator instance wrote to channels.", lambda o: o.bytes_out),
    ("dropped_records", "Records shed by a drop-policy output.", lambda o: o.dropped),
    ("late_records", "Records a window dropped as later than its allowed lateness.", lambda o: o.late),
    ("busy_seconds", "Seconds the instance's process was neither idle nor backpressured.", lambda o: o.busy_s),
    ("idle_seconds", "Seconds the instance's process waited for input.", lambda o: o.idle_s),
    ("backpressured_seconds", "Seconds the instance's process waited for credit on an output.",
     lambda o: o.backpressured_s),
]


class _Collector:
    """Builds the metric families from a board snapshot at every scrape."""

    def __init__(self, snapshot: Callable[[], JobCounters]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        job = self.snapshot()
        labels = ["operator", "instance"]
        for name, doc, value in _COUNTERS:
            family = CounterMetricFamily(f"mpstream_{name}", doc, labels=labels)
            for op in job.operators:
                family.add_metric([op.name, str(op.instance)], value(op))
            yield family
        fill = GaugeMetricFamily("mpstream_input_fill_ratio", "The fullest input ring of the instance's process.",
                                 labels=labels)
        watermark = GaugeMetricFamily("mpstream_watermark", "The operator instance's event time.", labels=labels)
        for op in job.operators:
            fill.add_metric([op.name, str(op.instance)], op.input_fill)
            if op.watermark is not None:
                watermark.add_metric([op.name, str(op.instance)], op.watermark)
        yield fill
        yield watermark
        yield CounterMetricFamily("mpstream_checkpoints", "Checkpoints completed.", value=job.checkpoints)
        yield CounterMetricFamily("mpstream_restarts", "Restarts from a checkpoint after a failure.", value=job.restarts)
        if job.last_checkpoint is not None:
            yield GaugeMetricFamily("mpstream_last_checkpoint_duration_seconds", "The last checkpoint's duration.",
                                    value=job.last_checkpoint["duration_s"])
            yield GaugeMetricFamily("mpstream_last_checkpoint_timestamp_seconds",
                                    "When the last checkpoint completed (unix time).", value=job.last_checkpoint["at"])


class MetricsServer:
    """Serves a job's counters on 127.0.0.1:port until :meth:`close`."""

    def __init__(self, port: int, snapshot: Callable[[], JobCounters]) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise PlanError("metrics_port needs prometheus-client: pip install 'mpstream[metrics]'") from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot))
        try:
            self._server, self._thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        except OSError as exc:
            raise PlanError(f"metrics_port={port}: cannot serve metrics on 127.0.0.1:{port} ({exc}); "
                            f"choose a free port") from exc
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
