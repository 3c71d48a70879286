"""Private RabbitMQ and PostgreSQL instances that a test may stop and restart.

The shared services on 5672 and 5432 serve every engineer and CI: fault tests never touch them.
Each instance here lives in a temp directory with ports of its own, runs as a child process, and
is stopped and removed when its fixture ends.

- ``PrivateRabbit``: a second RabbitMQ node (own node name, AMQP, distribution and management
  ports, mnesia and log directories). Durable queues and persistent messages survive ``restart``.
- ``PrivatePostgres``: a throw-away cluster (``initdb``, trust auth) on its own port and socket
  directory. PostgreSQL refuses to run as root, so as root it runs as ``postgres`` (``runuser``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika
import psycopg2

from tests.processes import free_port


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class PrivateRabbit:
    """A RabbitMQ node of our own, started with ``rabbitmq-server`` in the foreground."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = f"horde-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port, self.dist_port, self.management_port = free_port(), free_port(), free_port()
        (root / "mnesia").mkdir(parents=True)
        (root / "log").mkdir()
        (root / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (root / "rabbitmq-env.conf").write_text("")
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
            "loopback_users = none\n"
        )
        if os.geteuid() == 0:  # as root, the rabbitmq-server wrapper runs the node as ``rabbitmq``
            for path in (root, *root.rglob("*")):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"), "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(root / "rabbit.pid"),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["rabbitmqctl", "-n", self.node, *args], env=self.env, capture_output=True,
                              timeout=timeout)

    def up(self) -> bool:
        try:
            pika.BlockingConnection(pika.URLParameters(self.url + "?connection_attempts=1")).close()
            return True
        except pika.exceptions.AMQPError:
            return False

    def start(self) -> None:
        began = time.monotonic()
        log = open(self.root / "server.out", "ab")
        self.process = subprocess.Popen(["rabbitmq-server"], env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        _wait(lambda: self.up() or self.process.poll() is not None, 120, f"RabbitMQ node {self.node}")
        if self.process.poll() is not None:
            raise AssertionError(f"RabbitMQ node {self.node} exited: {(self.root / 'server.out').read_text()[-3000:]}")
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        if self.process is None:
            return
        self._ctl("stop")
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)
        self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


class PrivatePostgres:
    """A PostgreSQL cluster of our own (trust auth) on a private port and socket directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.data = root / "data"
        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not versions:
            raise AssertionError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(versions[-1])
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                       # fsync off is safe here (only the server process dies, never the OS); synchronous_commit
                       # stays on, or an immediate stop would lose commits a real crash keeps.
                       "fsync = off\nfull_page_writes = off\nmax_connections = 200\n")
        self.start_seconds = 0.0

    def _run(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        command = ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)
        done = subprocess.run(command, capture_output=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {done.stdout.decode()}{done.stderr.decode()}")
        return done

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", *args)

    def start(self) -> None:
        began = time.monotonic()
        self._pg_ctl("start")
        self.start_seconds = time.monotonic() - began

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop as a crash would (``immediate``: no checkpoint, clients cut), wait, start again."""
        self.stop("immediate")
        time.sleep(down_seconds)
        self.start()

    def create_database(self) -> str:
        name = f"horde_fault_{uuid.uuid4().hex[:8]}"
        conn = psycopg2.connect(self.admin_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


def private_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
