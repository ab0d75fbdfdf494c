"""The README's run command's database: an embedded PostgreSQL in the data folder, started with the service
and stopped with it, also after an earlier run was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from tests.service_process import free_port


def _serve(data_dir, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSVC_")}
    env.update(PAYSVC_DATA_DIR=str(data_dir), PAYSVC_PORT=str(port), PAYSVC_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "paysvc", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("paysvc serve did not become ready")


def _postmasters(data_dir) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] == "postgres" and str(data_dir) in cmd:
            found.append(p)
    return found


def test_the_embedded_database_stops_with_the_service_even_after_a_run_was_killed(tmp_path):
    """Found by an operator's walk-through: after a SIGKILL, the database kept running (expected: nobody was
    left to stop it), was reused by the next run, and was not stopped when that run stopped cleanly."""
    data = tmp_path / "data"
    port = free_port()
    first = _serve(data, port)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert _postmasters(data), "the killed run's database is still there for the next run"
    second = _serve(data, port)                         # reuses it: ready again, same data
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0, second.stderr.read().decode()[-2000:]
    deadline = time.time() + 15
    while _postmasters(data) and time.time() < deadline:
        time.sleep(0.2)
    left = _postmasters(data)
    for p in left:                                       # do not leave it behind if the test fails
        p.terminate()
    assert not left, "the database outlived a clean stop"
