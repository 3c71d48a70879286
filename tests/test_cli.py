"""The ``horde`` command as an operator uses it, against this session's PostgreSQL database."""

from __future__ import annotations

import re
import subprocess
import sys

from config import Settings
from tests.processes import REPO, settings_env


def horde(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=settings_env(settings),
                          capture_output=True, text=True, timeout=60)


def test_help_teaches_every_command_without_loading_torch(settings: Settings) -> None:
    result = horde(settings, "--help")
    assert result.returncode == 0
    for command in ("up", "api", "ledger", "worker", "db", "admin"):
        assert command in result.stdout
    assert "examples:" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, cli.main; cli.main.build_parser(); print('torch' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False"


def test_operator_creates_a_user_and_a_worker_grants_kudos_and_reads_the_books(settings: Settings) -> None:
    created = horde(settings, "admin", "create-user", "carol")
    assert created.returncode == 0, created.stderr
    username = re.search(r"created (carol#\d+)", created.stdout).group(1)
    apikey = re.search(r"apikey: (\S+)", created.stdout).group(1)
    assert len(apikey) == 22 and apikey.isalnum()

    worker = horde(settings, "admin", "create-worker", "carols-gpu", "--owner", username)
    assert worker.returncode == 0 and "registered worker carols-gpu" in worker.stdout

    granted = horde(settings, "admin", "grant", username, "250", "--reason", "welcome")
    assert granted.returncode == 0 and "granted 250" in granted.stdout

    report = horde(settings, "admin", "report")
    assert report.returncode == 0
    assert re.search(rf"{re.escape(username)}\)?\s+250\.00", report.stdout), report.stdout
    assert "welcome" in report.stdout

    other = re.search(r"created (dave#\d+)", horde(settings, "admin", "create-user", "dave").stdout).group(1)
    for _ in range(2):  # the same idempotency key moves the kudos once
        moved = horde(settings, "admin", "transfer", username, other, "40", "--key", "gift-1")
        assert moved.returncode == 0, moved.stderr
    assert "already done" in moved.stdout
    assert re.search(rf"{re.escape(other)}\)?\s+40\.00", horde(settings, "admin", "report").stdout)
    refused = horde(settings, "admin", "transfer", username, username, "1")
    assert refused.returncode != 0 and "themselves" in refused.stderr

    role = horde(settings, "admin", "role", username, "trusted")
    assert role.returncode == 0 and "trusted" in role.stdout

    reconciled = horde(settings, "admin", "reconcile")
    assert reconciled.returncode == 0, reconciled.stdout


def test_operator_mistakes_get_one_clear_line(settings: Settings) -> None:
    for argv, expected in [
        (("admin", "grant", "nobody#999999", "5"), "no user"),
        (("admin", "grant", "Anonymous#0", "-5"), "error:"),
        (("admin", "create-worker", "Bad Name!", "--owner", "Anonymous#0"), "worker name"),
    ]:
        result = horde(settings, *argv)
        assert result.returncode != 0
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
