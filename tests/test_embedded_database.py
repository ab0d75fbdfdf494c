"""The README's run command's database: an embedded PostgreSQL in the data folder, started with the service
and stopped with it, also after an earlier run was killed."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from tests.service_process import ServiceProcess, free_port, service_env


def _embedded(data_dir) -> ServiceProcess:
    """``paysvc serve`` as the README runs it: no PAYSVC_DATABASE_URL, its database in the data folder."""
    svc = ServiceProcess("unused", PAYSVC_DATA_DIR=str(data_dir))
    del svc.env["PAYSVC_DATABASE_URL"]
    return svc


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
    first = _embedded(data).start()
    first.kill()
    assert _postmasters(data), "the killed run's database is still there for the next run"
    second = _embedded(data).start()                    # reuses it: ready again, same data
    second.stop()
    assert second.proc.returncode == 0, second.proc.stderr.read().decode()[-2000:]
    deadline = time.time() + 15
    while _postmasters(data) and time.time() < deadline:
        time.sleep(0.2)
    left = _postmasters(data)
    for p in left:                                       # do not leave it behind if the test fails
        p.terminate()
    assert not left, "the database outlived a clean stop"


def test_the_ledgers_read_commands_on_the_embedded_database_check_it_and_stop_it(tmp_path):
    """verify (like reconcile, export, trial-balance and journal) on the README's database: refused, changing
    nothing, until it is migrated; then it runs; and the database it started is stopped each time."""
    data = tmp_path / "data"
    env = service_env("unused", free_port(), PAYSVC_DATA_DIR=str(data))
    del env["PAYSVC_DATABASE_URL"]

    def paysvc(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "paysvc", *args], env=env, capture_output=True, text=True,
                             timeout=120)
        deadline = time.time() + 15
        while _postmasters(data) and time.time() < deadline:
            time.sleep(0.2)
        left = _postmasters(data)
        for p in left:
            p.terminate()
        assert not left, f"paysvc {' '.join(args)} left its database running"
        return out

    out = paysvc("ledger", "verify")
    assert out.returncode == 1 and "not migrated to this version of paysvc" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert paysvc("migrate").returncode == 0
    out = paysvc("ledger", "verify")
    assert out.returncode == 0 and "ledger verified" in out.stdout, (out.stdout, out.stderr)
