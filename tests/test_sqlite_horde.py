"""The README's horde, end to end on its default database: ``horde up`` on a SQLite file.

Every other end-to-end test runs on PostgreSQL; this one runs what ``./scripts/up.sh`` runs, as real
processes: ``horde db upgrade`` migrates a fresh SQLite file (no HORDE_DATABASE_URL: the default
``state_dir/horde.db``), ``horde admin`` makes an operator, then ``horde up`` starts the API, the
ledger and the two demo workers (tiny-sd, tiny-gpt2, built by the workers themselves) on a fresh
RabbitMQ vhost. Over HTTP a registered user, funded by the admin API, submits an image job and a
text job; both must come back with a generation and be settled by the ledger: the demo workers'
owner is paid for both (and for uptime: the interval is a few seconds here, so the uptime service's
grouped writes run on SQLite too), the requester pays, the books balance. SIGTERM to ``horde up``
must then stop every process it started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests import services
from tests.processes import REPO, free_port

T = TypeVar("T")

IMAGE_MODEL, TEXT_MODEL = "tiny-sd", "tiny-gpt2"  # what `horde up`'s demo workers serve (cli/up.py)
DEMO_USER, IMAGE_WORKER, TEXT_WORKER = "demo", "demo-worker", "demo-text-worker"  # cli/admin.py
JOB_TIMEOUT = 120.0  # includes the workers' start: torch imports and the tiny models' build
# Several jobs per request, so that claims, completions and settlements arrive close together and
# the API's grouped statements (api/claims.py, api/results.py) write more than one row at a time.
IMAGES, TEXTS = 4, 3
FUNDS = 1000.0


@dataclass
class SqliteHorde:
    """A running ``horde up`` on a SQLite file, seen from outside: its process, HTTP, its log."""

    process: subprocess.Popen[bytes]
    http: httpx.Client
    env: dict[str, str]
    state_dir: Path
    log_path: Path
    admin_key: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def horde_env(state_dir: Path, rabbitmq_url: str, api_port: int) -> dict[str, str]:
    """Settings as HORDE_* variables; any HORDE_* of the caller's shell is dropped, so the
    database is the default one (a SQLite file in the state directory), as for `./scripts/up.sh`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HORDE_")}
    env.update(
        HORDE_STATE_DIR=str(state_dir), HORDE_RABBITMQ_URL=rabbitmq_url, HORDE_API_PORT=str(api_port),
        # Short enough that both demo workers earn uptime while the test runs (heartbeats every 5 s).
        HORDE_UPTIME_INTERVAL_SECONDS="3",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1",
    )
    return env


def horde_cli(env: dict[str, str], *argv: str) -> str:
    """Run one ``horde`` command to its end; its output, or a failure that shows it."""
    done = subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"horde {' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def make_admin(env: dict[str, str]) -> str:
    """An operator with the admin role, made with `horde admin` as a person would; its API key."""
    created = horde_cli(env, "admin", "create-user", "operator")
    username = re.search(r"created (\S+#\d+)", created)
    apikey = re.search(r"apikey: (\S+)", created)
    assert username and apikey, created
    horde_cli(env, "admin", "role", username.group(1), "admin")
    return apikey.group(1)


def poll(what: str, probe: Callable[[], T | None], horde: SqliteHorde, timeout: float) -> T:
    """``probe()`` until it gives something; fails with the horde's log if it never does or
    ``horde up`` dies meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if horde.process.poll() is not None:
            raise AssertionError(f"horde up exited ({horde.process.returncode}) while waiting for {what}:\n"
                                 f"{horde.log()[-6000:]}")
        found = probe()
        if found is not None:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; horde up's log:\n{horde.log()[-6000:]}")


def descendants(root: int) -> set[int]:
    """Every live process below ``root``, from /proc (children reparented elsewhere are not found:
    the process-group check in ``stop_horde`` covers those)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def sqlite_horde(tmp_path: Path) -> Iterator[SqliteHorde]:
    rabbitmq_url = services.create_vhost("horde-sqlite")
    state_dir = tmp_path / "state"
    env = horde_env(state_dir, rabbitmq_url, free_port())
    log_path = tmp_path / "horde-up.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        assert "database schema is up to date" in horde_cli(env, "db", "upgrade")
        assert (state_dir / "horde.db").is_file(), "horde db upgrade made no SQLite file in the state directory"
        admin_key = make_admin(env)
        with open(log_path, "wb") as log:
            # Its own session: its process group holds everything it starts, to be checked at the end.
            process = subprocess.Popen([sys.executable, "-m", "cli.main", "up"], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        http = httpx.Client(base_url=f"http://127.0.0.1:{env['HORDE_API_PORT']}", timeout=30)
        horde = SqliteHorde(process, http, env, state_dir, log_path, admin_key)
        try:
            poll("the banner of horde up", lambda: True if "The horde is up" in horde.log() else None, horde, 90)
            yield horde
        finally:
            http.close()
    finally:
        if process is not None and group_alive(process.pid):  # the test failed before stopping it
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        services.delete_vhost(rabbitmq_url)


def get_json(horde: SqliteHorde, path: str, **kwargs: Any) -> Any:
    response = horde.http.get(path, **kwargs)
    assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
    return response.json()


def funded_user(horde: SqliteHorde) -> tuple[int, str]:
    """A user registered over HTTP and funded by the admin API: (id, apikey)."""
    response = horde.http.post("/api/v2/register", json={"username": "sqlite-requester"})
    assert response.status_code == 201, response.text
    user = response.json()
    response = horde.http.post("/api/v2/admin/kudos", headers={"apikey": horde.admin_key},
                               json={"username": user["username"], "amount": FUNDS, "reason": "test funds"})
    assert response.status_code == 200, response.text
    assert response.json()["balance"] == FUNDS
    return user["id"], user["apikey"]


def submit(horde: SqliteHorde, path: str, apikey: str, body: dict[str, Any]) -> dict[str, Any]:
    response = horde.http.post(path, headers={"apikey": apikey}, json=body)
    assert response.status_code == 202, f"POST {path}: {response.status_code} {response.text}"
    return response.json()


def wait_done(horde: SqliteHorde, status_path: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        status = get_json(horde, status_path)
        return status if status["done"] or status["faulted"] else None

    return poll(f"{status_path} to be done", finished, horde, JOB_TIMEOUT)


def ledger_entries(horde: SqliteHorde, **query: str) -> list[dict[str, Any]]:
    page = get_json(horde, "/api/v2/admin/ledger/entries", headers={"apikey": horde.admin_key},
                    params={**query, "per_page": "1000"})
    assert not page["has_more"]
    return page["entries"]


def demo_owner(horde: SqliteHorde) -> dict[str, Any]:
    [owner] = [u for u in get_json(horde, "/api/v2/users") if u["username"].startswith(f"{DEMO_USER}#")]
    return owner


def stop_horde(horde: SqliteHorde) -> None:
    """SIGTERM to ``horde up`` alone: it must stop its children and exit 0, leaving nothing behind."""
    children = descendants(horde.process.pid)
    assert len(children) >= 4, f"horde up runs {len(children)} processes, expected api, ledger and two workers"
    horde.process.send_signal(signal.SIGTERM)
    try:
        code = horde.process.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"horde up did not exit within 60s of SIGTERM:\n{horde.log()[-6000:]}") from None
    assert code == 0, f"horde up exited {code} on SIGTERM:\n{horde.log()[-6000:]}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (group_alive(horde.process.pid) or any(map(alive, children))):
        time.sleep(0.2)
    left = sorted(pid for pid in children if alive(pid))
    assert not left and not group_alive(horde.process.pid), f"processes left after SIGTERM: {left}"


def test_horde_up_on_sqlite_generates_settles_and_stops(sqlite_horde: SqliteHorde) -> None:
    horde = sqlite_horde
    requester_id, apikey = funded_user(horde)

    image = submit(horde, "/api/v2/generate/async", apikey, {
        "prompt": "a lighthouse at dusk", "models": [IMAGE_MODEL],
        "params": {"width": 64, "height": 64, "steps": 4, "seed": "7", "n": IMAGES}})
    text = submit(horde, "/api/v2/generate/text/async", apikey, {
        "prompt": "The lighthouse keeper said", "models": [TEXT_MODEL],
        "params": {"max_length": 16, "seed": 7, "n": TEXTS}})
    image_status = wait_done(horde, f"/api/v2/generate/status/{image['id']}")
    text_status = wait_done(horde, f"/api/v2/generate/text/status/{text['id']}")

    assert image_status["done"] and not image_status["faulted"], image_status
    assert len(image_status["generations"]) == IMAGES, image_status
    for generation in image_status["generations"]:
        assert generation["img"] and generation["state"] == "ok", generation
        assert generation["model"] == IMAGE_MODEL and generation["worker_name"] == IMAGE_WORKER, generation
    assert text_status["done"] and not text_status["faulted"], text_status
    assert len(text_status["generations"]) == TEXTS, text_status
    for generation in text_status["generations"]:
        assert isinstance(generation["text"], str) and generation["state"] == "ok", generation
        assert generation["model"] == TEXT_MODEL and generation["worker_name"] == TEXT_WORKER, generation

    # The ledger settles from events: wait until the owner was paid for both kinds of work, and for uptime.
    def settled() -> dict[str, Any] | None:
        owner = demo_owner(horde)
        fulfilled = owner["records"]["fulfillment"]
        paid_uptime = ledger_entries(horde, account=owner["username"], kind="uptime")
        return owner if fulfilled["image"] >= IMAGES and fulfilled["text"] >= TEXTS and paid_uptime else None

    owner = poll("the ledger to pay the demo workers' owner", settled, horde, 60)
    assert owner["records"]["fulfillment"] == {"image": IMAGES, "text": TEXTS, "interrogation": 0}, owner
    earned = ledger_entries(horde, account=owner["username"], kind="generation")
    # Paid once per job: one entry per generation, each naming the job it pays for.
    paid_jobs = sorted(e["job_id"] for e in earned)
    assert paid_jobs == sorted(g["id"] for g in image_status["generations"] + text_status["generations"]), earned
    by_worker = {name: [e["model"] for e in earned if e["worker"] == name] for name in (IMAGE_WORKER, TEXT_WORKER)}
    assert by_worker == {IMAGE_WORKER: [IMAGE_MODEL] * IMAGES, TEXT_WORKER: [TEXT_MODEL] * TEXTS}, earned
    assert all(e["amount"] > 0 for e in earned), earned
    # Uptime is paid on while the horde runs: read the balance and the entries with no settlement
    # between them (the same balance before and after reading the entries).
    def quiet_books() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]] | None:
        before = demo_owner(horde)
        uptime = ledger_entries(horde, account=before["username"], kind="uptime")
        everything = ledger_entries(horde, account=before["username"])
        after = demo_owner(horde)
        return (after, uptime, everything) if after["kudos"] == before["kudos"] else None

    owner, uptime, everything = poll("a quiet moment in the owner's books", quiet_books, horde, 30)
    assert owner["kudos"] == pytest.approx(sum(e["amount"] for e in everything)), (owner, everything)
    assert owner["kudos"] == pytest.approx(sum(e["amount"] for e in earned + uptime)), everything
    assert image_status["kudos"] + text_status["kudos"] == pytest.approx(sum(e["amount"] for e in earned))

    requester = get_json(horde, f"/api/v2/users/{requester_id}")
    assert requester["records"]["request"] == {"image": IMAGES, "text": TEXTS, "interrogation": 0}, requester
    assert requester["kudos"] < FUNDS - sum(e["amount"] for e in earned) + 1e-6, requester  # paid, and taxed
    workers = {name: get_json(horde, f"/api/v2/workers/name/{name}") for name in (IMAGE_WORKER, TEXT_WORKER)}
    assert workers[IMAGE_WORKER]["requests_fulfilled"] == IMAGES, workers
    assert workers[TEXT_WORKER]["requests_fulfilled"] == TEXTS, workers
    assert all(w["online"] and w["uncompleted_jobs"] == 0 for w in workers.values()), workers
    totals = get_json(horde, "/api/v2/admin/ledger/totals", headers={"apikey": horde.admin_key})
    assert totals["balanced"], totals

    served = {m["name"]: m for kind in ("image", "text")
              for m in get_json(horde, "/api/v2/status/models", params={"type": kind})}
    assert served[IMAGE_MODEL]["type"] == "image" and served[TEXT_MODEL]["type"] == "text", served
    assert served[IMAGE_MODEL]["count"] >= 1 and served[TEXT_MODEL]["count"] >= 1, served

    stop_horde(horde)
    log = horde.log()
    assert "Traceback" not in log, f"horde up's processes logged a traceback:\n{log[-8000:]}"
    errors = [line for line in log.splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]
    assert not errors, "horde up's processes logged errors:\n" + "\n".join(errors)
    assert "reconciles" in horde_cli(horde.env, "admin", "reconcile")
