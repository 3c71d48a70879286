"""The horde's real processes for end-to-end tests: ``horde api``, ``horde ledger``, ``horde worker``.

Each runs as its own OS process (as in production) with settings passed through HORDE_* variables,
so tests can SIGKILL them. Logs go to files under the session's state directory.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from config import Settings

REPO = Path(__file__).resolve().parent.parent


_PORTS = random.Random()  # its own: hypothesis seeds the global one for reproducible examples
_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now, below the ephemeral range: a port the kernel hands out for binding to 0 can
    be taken, before the server that was given it binds, as the local port of some client's
    outgoing connection (a private RabbitMQ node once failed to start: dist_port_already_used)."""
    low = _ephemeral_low()
    while True:
        port = _PORTS.randrange(10_000, low)
        if port in _GIVEN:  # given to a server that may not have bound it yet
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[f"HORDE_{name.upper()}"] = str(value) if not isinstance(value, list) else __import__("json").dumps(value)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


class Process:
    def __init__(self, name: str, argv: list[str], settings: Settings) -> None:
        self.name = name
        self.log_path = settings.state_dir / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=settings_env(settings),
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.log(), timeout, f"{self.name} to log {text!r}", self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a power cut."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 20) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


def wait_until(predicate: Callable[[], object], timeout: float, what: str, process: Process | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and not process.alive():
            raise AssertionError(f"{process.name} died while waiting for {what}:\n{process.log()[-3000:]}")
        time.sleep(0.1)
    tail = f"\n{process.name} log:\n{process.log()[-3000:]}" if process else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def start_api(settings: Settings, name: str = "api") -> Process:
    """``name``: of its log file, for a second API process beside the session's."""
    api = Process(name, ["api"], settings)
    url = f"http://{settings.api_host}:{settings.api_port}/api/v2/status/heartbeat"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 60, "the API to answer", api)
    return api


def start_ledger(settings: Settings) -> Process:
    ledger = Process("ledger", ["ledger"], settings)
    ledger.wait_for_log("ledger consumer ready")
    return ledger


def start_worker(settings: Settings, name: str, models: list[str], models_dir: Path,
                 amqp_url: str | None = None) -> Process:
    """``amqp_url``: the worker's own credentials (a registered worker's); default the horde's."""
    argv = ["worker", "--name", name, "--models-dir", str(models_dir)]
    if amqp_url is not None:
        argv += ["--amqp-url", amqp_url]
    for model in models:
        argv += ["--model", model]
    worker = Process(f"worker-{name}", argv, settings)
    worker.wait_for_log("asking for jobs", timeout=90)
    return worker
