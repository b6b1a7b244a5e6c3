"""The main job: ``mpstream demo`` verifies itself and prints one JSON summary last."""

import csv
import json
import os
import subprocess
import sys


def test_demo_verifies_and_reports_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mpstream.cli", "demo", "--events", "300000", "--batch-size", "8192",
                          "--out", str(tmp_path), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["events"] == 300_000 and summary["verified"] is True
    assert summary["events_per_s"] > 0 and summary["seconds"] > 0
    ops = summary["operators"]
    assert ops["clicks"]["records_out"] == 300_000
    assert ops["per_domain.partial"]["instances"] == 2 and ops["per_domain"]["records_out"] == 1000
    assert "VERIFIED" in out.stdout
    rows = []
    for name in os.listdir(tmp_path):
        with open(tmp_path / name) as f:
            rows += list(csv.DictReader(f))
    assert len(rows) == 1000 and sum(int(r["count"]) for r in rows) == ops["valid"]["records_out"]


def test_demo_survives_killed_workers_and_still_verifies(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mpstream.cli", "demo", "--events", "3000000", "--batch-size", "16384",
                          "--out", str(tmp_path), "--checkpoint-interval", "0.05", "--kill-workers", "2", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["verified"] is True
    assert summary["restarts"] == len(summary["recovery_seconds"]) <= summary["kills"] <= 2
    assert not os.listdir(tmp_path / ".pending")  # the transactional sink published everything


DEMO_THEN_DIE = """
import os, signal, sys, threading
from mpstream.checkpoint import CheckpointStore
from mpstream.cli import main
store = CheckpointStore(sys.argv[1])
def kill_all_once_checkpointed():  # the whole process tree dies: coordinator and workers
    while not store.complete():
        threading.Event().wait(0.005)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=kill_all_once_checkpointed, daemon=True).start()
main(["demo", "--events", "20000000", "--batch-size", "16384", "--out", sys.argv[2],
      "--checkpoint-dir", sys.argv[1], "--checkpoint-interval", "0.05"])
"""


def test_demo_resumes_from_its_checkpoints_after_the_whole_tree_died(tmp_path):
    chk, out = tmp_path / "chk", tmp_path / "out"
    first = subprocess.run([sys.executable, "-c", DEMO_THEN_DIE, str(chk), str(out)], capture_output=True,
                           text=True, timeout=300, start_new_session=True)  # its own process group to kill
    assert first.returncode == -9
    second = subprocess.run([sys.executable, "-m", "mpstream.cli", "demo", "--events", "20000000", "--batch-size",
                             "16384", "--out", str(out), "--checkpoint-dir", str(chk), "--resume", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["verified"] is True
    assert summary["operators"]["clicks"]["records_in"] < 20_000_000  # it went on from the checkpoint
