"""What the benchmarks share: throw-away services, horde processes, CPU accounting, statistics.

Every run gets its own PostgreSQL database and RabbitMQ vhost (dropped afterwards) and its own
free port, so a benchmark never touches anyone else's data. Only 127.0.0.1 is used.

CPU is read from /proc: per process group (the process tree under test, every ``postgres``
process, the RabbitMQ VM, the load generator) in % of one core, and the whole machine's busy
time out of ``100 x cores``. PostgreSQL and RabbitMQ are shared by everything on the machine, so
their figures include whatever else ran during the window; ``other`` is busy time no group
accounts for (other people's tests, the benchmark driver itself).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

PG_ADMIN_URL = os.environ.get("HORDE_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_AMQP = os.environ.get("HORDE_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
RABBIT_MGMT = os.environ.get("HORDE_BENCH_RABBITMQ_MANAGEMENT", "http://127.0.0.1:15672")
RABBIT_ADMIN = ("guest", "guest")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


# --- throw-away services -------------------------------------------------------------------------


def create_database(prefix: str = "horde_bench") -> str:
    import psycopg2  # here, not at the top: a SQLite run (a GPU machine without PostgreSQL) needs none
    from psycopg2 import sql

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def drop_database(url: str) -> None:
    import psycopg2
    from psycopg2 import sql

    name = url.rsplit("/", 1)[1]
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


def create_vhost(prefix: str = "horde-bench") -> str:
    """A fresh vhost with full permissions for guest; returns its AMQP URL."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=RABBIT_MGMT, auth=RABBIT_ADMIN, timeout=10) as http:
        http.put(f"/api/vhosts/{quote(vhost, safe='')}").raise_for_status()
        http.put(f"/api/permissions/{quote(vhost, safe='')}/{RABBIT_ADMIN[0]}",
                 json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()
    return f"{RABBIT_AMQP}/{quote(vhost, safe='')}"


def delete_vhost(amqp_url: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    with httpx.Client(base_url=RABBIT_MGMT, auth=RABBIT_ADMIN, timeout=30) as http:
        http.delete(f"/api/vhosts/{vhost}")


def queue_depth(amqp_url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, from a passive declare: exact, unlike the management stats."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        result = connection.channel().queue_declare(queue, passive=True)
        return result.method.message_count, result.method.consumer_count
    finally:
        connection.close()


def wait_unheld(amqp_url: str, queue: str, timeout: float = 30.0) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue`` once it has no consumer left, or at ``timeout``.

    The dispatcher holds a few deliveries of each model queue unacked; when its connection closes
    RabbitMQ puts them back, and a queue without consumers has no unacked message: every message
    it holds is then ready, and counted by ``queue_depth``."""
    deadline = time.monotonic() + timeout
    while True:
        ready, consumers = queue_depth(amqp_url, queue)
        if consumers == 0 or time.monotonic() >= deadline:
            return ready, consumers
        time.sleep(0.1)


def register_workers(database_url: str, names: Sequence[str], amqp_url: str) -> None:
    """Register ``names`` as workers of one owner, authenticated as the vhost's AMQP user: the
    dispatcher answers only asks from registered workers with that ``user_id``."""
    from api.accounts import create_user, create_worker
    from broker.amqp import amqp_user
    from config.database import make_sync_engine

    engine = make_sync_engine(database_url)
    try:
        with engine.begin() as conn:
            owner, _ = create_user(conn, "bench-owner", pepper="horde-dev-pepper")
            for name in names:
                create_worker(conn, name, owner=owner, amqp_user=amqp_user(amqp_url))
    finally:
        engine.dispose()


def tiny_webp() -> bytes:
    """The fake workers' result: a 64x64 WebP, made once."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 160)).save(out, format="WEBP")
    return out.getvalue()


def image_capabilities(models: Sequence[str]) -> Any:
    """What a fake worker tells the dispatcher: image models, with a safety checker (anonymous
    jobs must be censored, and the dispatcher offers them only to a worker that can)."""
    from broker.messages import Capabilities, ModelOffer

    return Capabilities(models=[ModelOffer(name=m, kind="image") for m in models], can_censor=True)


def migrate(database_url: str) -> None:
    import migrations

    migrations.upgrade(database_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """A fresh database (migrated) and vhost, plus a state directory; ``close()`` removes them.

    The database is a PostgreSQL one, or with ``sqlite=True`` a SQLite file in the state directory
    (as ``horde up`` keeps by default): for a machine that has RabbitMQ but no PostgreSQL."""

    database_url: str
    rabbitmq_url: str
    state_dir: Path
    _tmp: tempfile.TemporaryDirectory  # type: ignore[type-arg]

    @classmethod
    def create(cls, *, sqlite: bool = False) -> "Stack":
        tmp = tempfile.TemporaryDirectory(prefix="horde-bench-")
        database_url = f"sqlite:///{tmp.name}/horde.db" if sqlite else create_database()
        try:
            migrate(database_url)
            rabbitmq_url = create_vhost()
        except BaseException:
            if not sqlite:
                drop_database(database_url)
            tmp.cleanup()
            raise
        return cls(database_url, rabbitmq_url, Path(tmp.name), tmp)

    def env(self, **extra: object) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HORDE_")}
        env.update(
            HORDE_DATABASE_URL=self.database_url, HORDE_RABBITMQ_URL=self.rabbitmq_url,
            HORDE_STATE_DIR=str(self.state_dir), HORDE_API_HOST="127.0.0.1", PYTHONUNBUFFERED="1",
        )
        env.update({f"HORDE_{k.upper()}": str(v) for k, v in extra.items()})
        return env

    def close(self) -> None:
        try:
            if not self.database_url.startswith("sqlite"):
                drop_database(self.database_url)
        finally:
            try:
                delete_vhost(self.rabbitmq_url)
            finally:
                self._tmp.cleanup()


# --- horde processes -------------------------------------------------------------------------------


class HordeProcess:
    """``python -m cli.main <argv>`` in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=env,
                                      stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited while waiting for {what}:\n{self.log()[-3000:]}")
            time.sleep(poll)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (uvicorn finishes requests in flight), SIGKILL to the group if it hangs."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


#: Requester limits (rates, queued-job caps) off: a benchmark is one client sending far more than any
#: person would. A benchmark may still pass its own values to ``start_api``.
REQUESTER_LIMITS_OFF: dict[str, object] = {
    "submit_rate_per_ip": 0, "submit_rate_per_key": 0, "submit_rate_anonymous": 0,
    "poll_rate_per_ip": 0, "poll_rate_per_key": 0,
    "max_queued_jobs_per_user": 0, "max_queued_jobs_anonymous": 0,
}


def start_api(stack: Stack, port: int, *, workers: int = 1, **settings: object) -> HordeProcess:
    settings = {**REQUESTER_LIMITS_OFF, **settings}
    env = stack.env(api_port=port, api_workers=workers, log_level=settings.pop("log_level", "WARNING"), **settings)
    api = HordeProcess("api", ["api"], env, stack.state_dir)
    url = f"http://127.0.0.1:{port}/api/v2/status/heartbeat"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    api.wait_for(up, 60, "the API to answer", poll=0.1)
    # Every worker process must have finished its start-up, not only the first to answer: otherwise
    # a load generator connecting now puts all its connections on the early ones. Each worker
    # opens its AMQP connection early in its start-up, so wait for one per worker, then a moment.
    api.wait_for(lambda: api_connections(stack.rabbitmq_url) >= workers, 60, f"{workers} API worker(s) to connect")
    # Workers get jobs only from the dispatcher, which one API process runs once it has won the
    # exclusive consume of the asks queue: a benchmark's first ask must not wait for that.
    api.wait_for(lambda: dispatcher_leads(stack.rabbitmq_url), 60, "a dispatcher to lead", poll=0.1)
    time.sleep(1.0)
    return api


def dispatcher_leads(amqp_url: str) -> bool:
    """Whether an API process's dispatcher consumes the asks queue (it leads)."""
    from broker.topology import ASKS_QUEUE

    try:
        return queue_depth(amqp_url, ASKS_QUEUE)[1] > 0
    except Exception:  # not declared yet: the API declares the topology as it starts
        return False


def api_connections(amqp_url: str, name: str = "horde-api") -> int:
    """How many AMQP connections named ``name`` the vhost of ``amqp_url`` has."""
    vhost = amqp_url.rsplit("/", 1)[1]
    try:
        with httpx.Client(base_url=RABBIT_MGMT, auth=RABBIT_ADMIN, timeout=10) as http:
            connections = http.get(f"/api/vhosts/{vhost}/connections").json()
    except (httpx.HTTPError, ValueError):
        return 0
    return sum(1 for conn in connections if (conn.get("client_properties") or {}).get("connection_name") == name)


# --- CPU accounting ------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, utime+stime ticks) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2:].split()
    return comm, int(rest[1]), int(rest[11]) + int(rest[12])


def _all_processes() -> dict[int, tuple[str, int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def process_tree(root: int, procs: dict[int, tuple[str, int, int]] | None = None) -> set[int]:
    procs = procs if procs is not None else _all_processes()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (_, ppid, _) in procs.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree & set(procs)


def _machine() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


RABBIT_COMMS = frozenset({"beam.smp", "erl_child_setup", "inet_gethost", "epmd"})


class CpuWindow:
    """CPU used between ``start()`` and ``stop()``, in % of one core, per group of processes.

    ``groups`` maps a label to the root pid of a process tree; ``postgres`` and ``rabbitmq``
    are added (every process of that name: shared with whatever else uses them).
    """

    def __init__(self, groups: dict[str, int], singles: dict[str, int] | None = None) -> None:
        self._roots = groups
        self._singles = singles or {}  # one process each, without its children (e.g. the driver itself)
        self._before: dict[int, tuple[str, int, int]] = {}
        self._machine_before = (0, 0)
        self._t0 = 0.0
        self.result: dict[str, float] = {}
        self.per_process: dict[str, dict[int, float]] = {}  # for the process-tree groups

    def start(self) -> "CpuWindow":
        self._before = _all_processes()
        self._machine_before = _machine()
        self._t0 = time.monotonic()
        return self

    def stop(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """``extra``: CPU seconds of processes that ended inside the window (see ``ChildrenCpu``)."""
        after = _all_processes()
        busy1, total1 = _machine()
        elapsed = time.monotonic() - self._t0
        scale = 100.0 / (elapsed * CLK_TCK)

        def used(pids: Iterable[int]) -> float:
            ticks = 0
            for pid in pids:
                if pid in after:
                    before = self._before.get(pid)
                    same = before is not None and before[0] == after[pid][0]
                    ticks += after[pid][2] - (before[2] if same else 0)
            return ticks * scale

        groups: dict[str, set[int]] = {label: process_tree(root, after) for label, root in self._roots.items()}
        groups.update({label: {pid} for label, pid in self._singles.items()})
        groups["pg"] = {pid for pid, (comm, _, _) in after.items() if comm.startswith("postgres")}
        groups["rmq"] = {pid for pid, (comm, _, _) in after.items() if comm in RABBIT_COMMS}
        result = {label: round(used(pids), 1) for label, pids in groups.items()}
        self.per_process = {label: {pid: round(used([pid]), 1) for pid in sorted(pids)}
                            for label, pids in groups.items() if label in self._roots}
        for label, seconds in (extra or {}).items():
            result[label] = round(100.0 * seconds / elapsed, 1)
        busy0, total0 = self._machine_before
        # Whole machine, % of one core (out of 100 x cores).
        result["busy"] = round(100.0 * CORES * (busy1 - busy0) / max(1, total1 - total0), 1)
        result["other"] = round(result["busy"] - sum(v for k, v in result.items() if k != "busy"), 1)
        result["seconds"] = round(elapsed, 2)
        self.result = result
        return result


class ChildrenCpu:
    """CPU seconds of this process's children that were waited for since construction (e.g. wrk)."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def used(self) -> float:
        return self._now() - self._start


def wait_quiet(max_busy: float, timeout: float) -> float:
    """Wait (at most ``timeout`` s) until the machine's busy CPU over 1 s is below ``max_busy``
    (% of one core); the last reading. Other people's work shares this machine."""
    deadline = time.monotonic() + timeout
    while True:
        busy = busy_now(1.0)
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy
        time.sleep(2.0)


def add_noise_arguments(parser: Any) -> None:
    """The options every benchmark shares for living with other people's work on this machine."""
    parser.add_argument("--max-background", type=float, default=25.0,
                        help="before each run, wait until the machine's busy CPU (%% of one core, over 1 s) is at "
                             "most this (default 25)")
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help="wait at most this many seconds for that, then start anyway (default 120)")
    parser.add_argument("--max-other", type=float, default=25.0,
                        help="a run is clean if processes outside the benchmark used at most this much CPU (%% of "
                             "one core) during its measured window; medians use clean runs (default 25)")
    parser.add_argument("--max-attempts", type=int, default=0,
                        help="stop after this many runs in all, clean or not (default: 4 x runs x configurations)")


def interleaved(configs: Sequence[Any], runs: int, max_attempts: int,
                one: Callable[[Any, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``one(config, attempt)`` round-robin over ``configs`` until each has ``runs`` clean runs
    (``run["clean"]``) or ``max_attempts`` runs were made. Interleaving spreads slow drifts of the
    machine's load over every configuration alike. Returns every run, clean or not."""
    clean = [0] * len(configs)
    results: list[dict[str, Any]] = []
    attempt = 0
    while attempt < max_attempts and any(n < runs for n in clean):
        for i, config in enumerate(configs):
            if clean[i] >= runs or attempt >= max_attempts:
                continue
            attempt += 1
            run = one(config, attempt)
            results.append(run)
            clean[i] += bool(run.get("clean"))
    return results


def usable(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The runs medians are taken over: the clean ones, or all of them (flagged) if none is clean."""
    clean = [r for r in runs if r.get("clean")]
    if clean:
        return clean, f"{len(clean)} clean of {len(runs)}"
    return runs, f"NO CLEAN RUN: all {len(runs)} disturbed"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def busy_now(seconds: float = 1.0) -> float:
    """The machine's busy CPU over ``seconds`` (% of one core, out of 100 x cores): the background load."""
    b0, t0 = _machine()
    time.sleep(seconds)
    b1, t1 = _machine()
    return round(100.0 * CORES * (b1 - b0) / max(1, t1 - t0), 1)


# --- environment --------------------------------------------------------------------------------


def git_state() -> str:
    """The commit measured, and whether the working tree differed from it (others edit it live)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def postgresql_description() -> tuple[str, dict[str, str]]:
    """PostgreSQL's version and durability settings, or "none" where there is none to ask."""
    try:
        import psycopg2

        conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=5)
    except Exception:  # no driver or no server: a SQLite run on a machine without PostgreSQL
        return "none", {}
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        version = cur.fetchone()[0]
        cur.execute("SELECT name, setting FROM pg_settings WHERE name IN ('fsync','synchronous_commit')")
        settings = dict(cur.fetchall())
    conn.close()
    return version, settings


def machine_description() -> dict[str, Any]:
    mem_kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        with httpx.Client(base_url=RABBIT_MGMT, auth=RABBIT_ADMIN, timeout=10) as http:
            overview = http.get("/api/overview").json()
        rabbit = f"{overview.get('rabbitmq_version')} (Erlang {overview.get('erlang_version')})"
    except (httpx.HTTPError, ValueError):
        rabbit = "unknown"
    pg, pg_settings = postgresql_description()
    packages = {}
    for name in ("fastapi", "uvicorn", "uvloop", "httptools", "pydantic", "sqlalchemy", "asyncpg", "aio-pika",
                 "aiormq", "pika", "psycopg2-binary"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git": git_state(),
        "cpu": f"{CORES} x {cpu}", "memory_gib": round(mem_kib / 2**20, 1), "kernel": platform.release(),
        "python": platform.python_version(), "rabbitmq": rabbit, "postgresql": pg, "pg_settings": pg_settings,
        "packages": packages,
    }


# --- statistics and output ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


@dataclass
class Report:
    """Results printed as they come and saved as JSON (``--json``)."""

    benchmark: str
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    machine: dict[str, Any] = field(default_factory=machine_description)
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def save(self, path: str | None) -> None:
        if path:
            Path(path).write_text(json.dumps(self.__dict__, indent=2, default=str) + "\n")
            print(f"results written to {path}")


def fmt_cpu(cpu: dict[str, float], order: Sequence[str]) -> str:
    return "/".join(f"{cpu.get(k, 0):.0f}" for k in order) + f" · busy {cpu.get('busy', 0):.0f}"


def print_machine(machine: dict[str, Any]) -> None:
    print(f"code: {machine['git']}")
    print(f"machine: {machine['cpu']}, {machine['memory_gib']} GiB; Python {machine['python']}; "
          f"RabbitMQ {machine['rabbitmq']}; PostgreSQL {machine['postgresql']} {machine['pg_settings']}")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()))
