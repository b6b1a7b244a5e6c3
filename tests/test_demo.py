"""The main job: ``mpstream demo`` verifies itself and prints one JSON summary last."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest


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
    assert ops["per_domain"]["instances"] == 2 and ops["per_domain"]["records_out"] == 1000
    assert summary["processes"] == {"clicks": ["clicks", "parse", "valid", "per_domain.combine"],
                                    "per_domain": ["per_domain", "csv", "check"]}  # which operators share a process
    table = {line.split()[0]: line.split()[1] for line in lines if line.split()[:1] in (["parse"], ["csv"])}
    assert table == {"parse": "clicks", "csv": "per_domain"}  # the table's "in the process of" column
    assert "VERIFIED" in out.stdout
    rows = []
    for name in os.listdir(tmp_path):
        with open(tmp_path / name) as f:
            rows += list(csv.DictReader(f))
    assert len(rows) == 1000 and sum(int(r["count"]) for r in rows) == ops["valid"]["records_out"]
    timeline = summary["timeline"]["columns"]  # what mpstream plot draws
    clicks = [n for op, n in zip(timeline["operator"], timeline["records_in"]) if op == "clicks"]
    assert clicks[-1] == 300_000 and clicks == sorted(clicks)


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


def demo(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "mpstream.cli", "demo", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--events", "-5"], "--events: must be an integer >= 0"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["--parallelism", "0"], "--parallelism: must be an integer >= 1"),
    (["--salt", "-1"], "--salt: must be an integer >= 0"),
    (["--event-time", "--unbounded"], "--event-time runs a bounded job"),
    (["--metrics-port", "70000"], "--metrics-port: must be a TCP port"),
    (["--aligned-checkpoint-timeout", "0.1"], "--aligned-checkpoint-timeout needs --unaligned-checkpoints"),
    (["--unaligned-checkpoints", "--aligned-checkpoint-timeout", "-1"],
     "--aligned-checkpoint-timeout: must be a number of seconds >= 0, got -1.0"),
    (["--checkpoint-interval", "0"], "--checkpoint-interval: must be a number of seconds > 0, got 0.0"),
])
def test_demo_refuses_bad_values_with_a_usage_error(args, message):
    out = demo(*args)
    assert out.returncode == 2 and "usage:" in out.stderr and message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("unaligned", [[], ["--unaligned-checkpoints"],
                                       ["--unaligned-checkpoints", "--aligned-checkpoint-timeout", "0.01"]],
                         ids=["aligned", "unaligned", "aligned-for-10ms"])
def test_the_event_time_demo_verifies_its_windows_across_killed_workers(tmp_path, unaligned):
    """Unaligned: watermarks and records in flight are kept by checkpoints and replayed."""
    out = demo("--event-time", "--events", "1500000", "--batch-size", "16384", "--out", str(tmp_path),
               "--checkpoint-interval", "0.05", "--kill-workers", "2", "--json", *unaligned)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["verified"] is True and summary["events"] == 1_500_000
    if unaligned == ["--unaligned-checkpoints"]:
        assert summary["in_flight_rows"] > 0
    if not unaligned:
        assert summary["in_flight_rows"] == 0
    assert summary["restarts"] <= summary["kills"] <= 2
    windows, late = [], []
    for name in os.listdir(tmp_path):
        if name.endswith(".csv"):
            with open(tmp_path / name) as f:
                (late if name.startswith("late_csv") else windows).extend(csv.DictReader(f))
    # the published files hold what the collect sink verified: each window once on time, late
    # firings accumulate; 1-minute windows over 1.5M events at 10,000 a second of event time
    assert len(windows) == summary["windows"] and len(late) == summary["late_side_output"] > 0
    assert sum(r["pane"] == "late" for r in windows) == summary["late_fired"] > 0
    starts = {r["window_start"] for r in windows}
    assert all(s.endswith(":00") or s.endswith(":00.000") for s in starts) and 3 <= len(starts) <= 9
    on_time = [(r["domain"], r["window_start"]) for r in windows if r["pane"] == "on_time"]
    assert len(on_time) == len(set(on_time))


def test_demo_with_zero_events_is_a_verified_empty_run(tmp_path):
    out = demo("--events", "0", "--out", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["events"] == 0 and summary["verified"] is True


def test_demo_without_out_removes_its_temporary_directory_and_says_so():
    import tempfile

    before = {e for e in os.listdir(tempfile.gettempdir()) if e.startswith("mpstream-demo-")}
    out = demo("--events", "100000")
    assert out.returncode == 0, out.stderr
    assert "not kept" in out.stdout and "--out" in out.stdout
    assert {e for e in os.listdir(tempfile.gettempdir()) if e.startswith("mpstream-demo-")} == before


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    import psutil
    from conftest import CTRL_C, wait_until

    cli = CTRL_C + "from mpstream.cli import main; sys.exit(main())"  # python -m mpstream.cli, Ctrl-C-able
    proc = subprocess.Popen([sys.executable, "-c", cli, "demo", "--events", "2000000000", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(psutil.Process(proc.pid).children()) >= 4, timeout=60, what="the demo's 4 workers")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1 and "interrupted" in stderr


def test_a_resumed_demo_reports_only_the_events_of_its_own_run(tmp_path):
    chk, out = tmp_path / "chk", tmp_path / "out"
    first = subprocess.run([sys.executable, "-c", DEMO_THEN_DIE, str(chk), str(out)], capture_output=True,
                           text=True, timeout=300, start_new_session=True)
    assert first.returncode == -9
    second = demo("--events", "20000000", "--batch-size", "16384", "--out", str(out), "--checkpoint-dir", str(chk),
                  "--resume", "--json")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    consumed = summary["operators"]["clicks"]["records_out"]
    assert summary["verified"] is True
    assert 0 < summary["events"] == consumed < 20_000_000  # this run's events, not the stream's
    assert summary["events_per_s"] == pytest.approx(summary["events"] / summary["seconds"], rel=0.01)


def stop_unbounded_demo(*args):
    """Starts ``mpstream demo --unbounded ... --json``, lets it commit checkpoints after the one
    its run started from (three), SIGTERMs the coordinator and returns its summary."""
    import psutil
    from conftest import wait_until

    from mpstream.checkpoint import CheckpointStore

    chk = args[args.index("--checkpoint-dir") + 1]
    store = CheckpointStore(chk)
    first = (store.complete() or [0])[-1]
    proc = subprocess.Popen([sys.executable, "-m", "mpstream.cli", "demo", "--unbounded", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (store.complete() or [0])[-1] >= first + 3, timeout=120, what="three new checkpoints")
    assert len(psutil.Process(proc.pid).children()) == 4  # a process per task: 2 tasks (chains) of 2 instances
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "VERIFIED" in stdout
    return json.loads(stdout.strip().splitlines()[-1])


def test_an_unbounded_demo_stops_on_sigterm_verifies_and_resumes(tmp_path):
    options = ["--rate", "20000", "--batch-size", "4096", "--out", str(tmp_path / "out"),
               "--checkpoint-dir", str(tmp_path / "chk"), "--checkpoint-interval", "0.2"]
    first = stop_unbounded_demo(*options, "--kill-workers", "1")
    assert first["verified"] is True and first["kills"] == 1 and first["restarts"] == 1
    assert first["final_checkpoint"] is not None and min(first["stopped_at"]) > 0
    assert first["events"] == sum(first["stopped_at"]) * 4000  # 20,000 events/s: batches of 4,000
    second = stop_unbounded_demo(*options, "--resume")  # verifies the output of both runs together
    assert second["verified"] is True
    assert all(b > a for a, b in zip(first["stopped_at"], second["stopped_at"]))
    assert second["events"] == (sum(second["stopped_at"]) - sum(first["stopped_at"])) * 4000
    assert not os.listdir(tmp_path / "out" / ".pending")


def test_an_unbounded_demo_serves_its_metrics_while_it_runs():
    import socket
    import urllib.request

    from conftest import wait_until

    with socket.socket() as probe:  # a port free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mpstream.cli", "demo", "--unbounded", "--rate", "50000",
                             "--batch-size", "5000", "--metrics-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scraped = {}

    def clicks_counted():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return False
        scraped["text"] = text
        return 'mpstream_records_in_total{instance="0",operator="clicks"}' in text and \
            'mpstream_records_in_total{instance="0",operator="clicks"} 0.0' not in text

    try:
        wait_until(clicks_counted, timeout=120, what="the demo's metrics to count clicks")
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "VERIFIED" in stdout, stderr
    for operator in ("clicks", "parse", "valid", "per_domain.combine", "per_domain", "csv"):
        assert f'operator="{operator}"' in scraped["text"]


def test_demo_with_its_metrics_port_taken_says_so_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = demo("--events", "1000", "--metrics-port", str(taken.getsockname()[1]))
    assert out.returncode == 2 and "cannot serve metrics" in out.stderr and "Traceback" not in out.stderr
