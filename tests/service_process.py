"""A real ``paysvc serve`` process for tests that kill it or drive it from the command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.conftest import TEST_PII_KEYS, TEST_SANDBOX_SECRET


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(dsn: str, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSVC_")}
    env.update({"PAYSVC_DATABASE_URL": dsn, "PAYSVC_PII_KEYS": TEST_PII_KEYS, "PAYSVC_PORT": str(port),
                "PAYSVC_SANDBOX_SECRET": TEST_SANDBOX_SECRET, "PAYSVC_LOG_LEVEL": "WARNING"})
    env.update(extra)
    return env


class ServiceProcess:
    def __init__(self, dsn: str, **extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = service_env(dsn, self.port, **extra)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "paysvc", "serve"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"paysvc serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("paysvc serve did not become ready")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "paysvc", *args], env=self.env, capture_output=True,
                              text=True, timeout=60)
