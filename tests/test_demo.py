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
