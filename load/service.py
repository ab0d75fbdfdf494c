"""Start paysvc service processes against a scratch database, for benchmarks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Iterator
from urllib.parse import urlparse

import asyncpg

_SOCKET_DIR = "/var/run/postgresql"
# PostgreSQL's Unix socket when the server is on this machine (as it is beside the service here), else TCP.
# Measured on this machine: the ledger benchmark's client used about a fifth less CPU per entry over the Unix
# socket than over loopback TCP, and the service makes several round trips per request.
_DEFAULT_DSN = (f"postgresql://postgres@/postgres?host={_SOCKET_DIR}"
                if os.path.exists(f"{_SOCKET_DIR}/.s.PGSQL.5432") else "postgresql://postgres@127.0.0.1:5432/postgres")
ADMIN_DSN = os.environ.get("PAYSVC_BENCH_DATABASE_URL", _DEFAULT_DSN)


try:
    import uvloop
    LOOP = "uvloop"
except ImportError:  # not installed (Windows): asyncio's own loop
    uvloop = None
    LOOP = "asyncio"


def run(coro):
    """Run ``coro`` on uvloop where it is installed, as the service runs: a load generator or client on the
    same cores as the service should cost no more CPU than it must."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        return runner.run(coro)

def dsn_for(name: str) -> str:
    """ADMIN_DSN with its database replaced (keeps a ``?host=/socket/dir`` query)."""
    return urlparse(ADMIN_DSN)._replace(path=f"/{name}").geturl()


PII_KEYS = "bench:" + base64.b64encode(os.urandom(32)).decode()
SANDBOX_SECRET = "bench-sandbox-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"paysvc_bench_{uuid.uuid4().hex[:8]}"

    async def create():
        c = await asyncpg.connect(ADMIN_DSN)
        await c.execute(f'CREATE DATABASE "{name}"')
        await c.close()

    async def drop():
        c = await asyncpg.connect(ADMIN_DSN)
        await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await c.close()

    asyncio.run(create())
    try:
        yield dsn_for(name)
    finally:
        asyncio.run(drop())


def service_env(dsn: str, port: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PAYSVC_DATABASE_URL": dsn, "PAYSVC_PII_KEYS": PII_KEYS, "PAYSVC_PORT": str(port),
           "PAYSVC_SANDBOX_SECRET": SANDBOX_SECRET, "PAYSVC_LOG_LEVEL": "WARNING"}
    env.update(extra)
    return env


def cli(dsn: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "paysvc", *args], env=service_env(dsn, 8080), capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@contextlib.contextmanager
def services(dsn: str, count: int, **extra: str) -> Iterator[list[str]]:
    """``count`` independent ``paysvc serve`` processes on one database; yields their base URLs."""
    cli(dsn, "migrate")
    procs, urls = [], []
    try:
        for _ in range(count):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "paysvc", "serve"],
                                          env=service_env(dsn, port, **extra), stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_ready(url)
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


def wait_ready(url: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds used so far by this machine's PostgreSQL processes, ``paysvc serve`` processes, this
    process (the load generator) and RabbitMQ's Erlang VM, read from /proc (Linux). Processes that exit in between are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"postgresql": 0.0, "service": 0.0, "generator": 0.0, "broker": 0.0}
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        used = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        if int(pid) == me:
            out["generator"] += used
        elif cmd.startswith("postgres") or "/bin/postgres" in cmd.split(" ", 1)[0]:
            out["postgresql"] += used
        elif "paysvc serve" in cmd:
            out["service"] += used
        elif "beam.smp" in cmd and "rabbit" in cmd:  # RabbitMQ's Erlang VM
            out["broker"] += used
    return out
