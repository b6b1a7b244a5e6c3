"""The coordinator's own cost: it sleeps while it waits, calls the progress callback at its
stated rate, and keeps taking checkpoints for the whole job."""

import resource
import time

import numpy as np

from mpstream.pipeline import Pipeline


def cpu_seconds() -> float:
    """CPU time of this process (the coordinator: the caller of run()), all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_waiting_coordinator_sleeps_reports_progress_at_its_rate_and_keeps_checkpointing(tmp_path):
    calls = []

    def slow(batch):
        time.sleep(0.005)  # the work of a slow operator, not a synchronisation
        return batch

    p = Pipeline(channel_capacity=1 << 16)
    (p.from_generator("fast", lambda i, offset: None if offset >= 300 else {"v": np.arange(1000)})
      .map("slow", slow).to_callback("sink", lambda b: None))
    before = cpu_seconds()
    result = p.run(checkpoint_dir=str(tmp_path), checkpoint_interval=0.1, progress=calls.append)
    used = cpu_seconds() - before
    # 300 batches at >= 5 ms each: the job runs >= 1.5 s, so >= 5 checkpoint intervals
    assert result.seconds >= 1.5
    assert used < 0.1 * result.seconds + 0.5, f"the coordinator used {used:.2f} s of CPU in {result.seconds:.2f} s"
    assert len(calls) <= 5 * result.seconds + 2, f"progress called {len(calls)} times in {result.seconds:.2f} s"
    assert calls and calls[-1]["rows"] == 300_000
    assert len(result.checkpoints) >= result.seconds / 0.1 / 4, f"{len(result.checkpoints)} checkpoints"
