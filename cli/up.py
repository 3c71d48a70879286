"""``horde up``: the whole horde on one machine: API, ledger and two demo workers with tiny models,
one for images (tiny-sd) and one for text (tiny-gpt2), so both job kinds run out of the box.

It uses RabbitMQ on localhost (which has no embedded form) and, unless HORDE_DATABASE_URL says
otherwise, a SQLite file. The four processes are children of this one; Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import httpx

from broker.amqp import connect_sync
from broker.errors import BrokerUnavailable
from config import Settings
from cli.admin import DEMO_TEXT_WORKER, DEMO_WORKER, ensure_demo_worker


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-worker", action="store_true", help="start only the API and the ledger (no demo workers)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        connect_sync(settings.rabbitmq_url, name="horde-up-check").close()
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import migrations

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url)
    ensure_demo_worker(settings)
    commands = {"api": ["api"], "ledger": ["ledger"]}
    if not args.no_worker:
        commands["worker"] = ["worker", "--demo", "--name", DEMO_WORKER]
        commands["text worker"] = ["worker", "--demo-text", "--name", DEMO_TEXT_WORKER]
    children = {name: subprocess.Popen([sys.executable, "-m", "cli.main", *argv]) for name, argv in commands.items()}
    stop = _install_stop_handler()
    try:
        if _wait_for_api(settings, children):
            _banner(settings)
        while not stop["requested"]:
            for name, child in children.items():
                if child.poll() is not None:
                    print(f"error: the {name} process exited with code {child.returncode}; stopping", file=sys.stderr)
                    return child.returncode or 1
            time.sleep(0.5)
        return 0
    finally:
        _stop_all(children)


def _install_stop_handler() -> dict[str, bool]:
    state = {"requested": False}

    def request_stop(*_: object) -> None:
        state["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return state


def _wait_for_api(settings: Settings, children: dict[str, subprocess.Popen[bytes]], timeout: float = 60) -> bool:
    url = f"http://{settings.api_host}:{settings.api_port}/api/v2/status/heartbeat"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if children["api"].poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _banner(settings: Settings) -> None:
    base = f"http://{settings.api_host}:{settings.api_port}"
    print(f"""
The horde is up: {base}/api/v2   (OpenAPI: {base}/docs)
Submit a job as the anonymous user:

  curl -s -X POST {base}/api/v2/generate/async -H 'apikey: 0000000000' -H 'Content-Type: application/json' \\
       -d '{{"prompt": "a lighthouse at dusk", "models": ["tiny-sd"],
            "params": {{"width": 64, "height": 64, "steps": 8}}}}'

Then poll: curl -s {base}/api/v2/generate/check/ID   and fetch: curl -s {base}/api/v2/generate/status/ID

A text job (the tiny random GPT-2 writes random bytes; a real model writes prose):

  curl -s -X POST {base}/api/v2/generate/text/async -H 'apikey: 0000000000' -H 'Content-Type: application/json' \\
       -d '{{"prompt": "The lighthouse keeper said", "models": ["tiny-gpt2"],
            "params": {{"max_length": 40, "stop_sequence": ["\\n"]}}}}'

Then poll and fetch: curl -s {base}/api/v2/generate/text/status/ID
Ctrl-C stops everything.
""", flush=True)


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
