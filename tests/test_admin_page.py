"""The admins' page (``GET /admin``) in a real headless Chromium (Debian's package), driven over the
DevTools protocol: an admin signs in and sees the ledger's real numbers in the charts; anyone else
sees the API's refusal. A screenshot of each is left in the session's state directory.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from api.roles import set_role
from broker.messages import JobDone
from config.database import utcnow
from ledger.book import settle_job
from ledger.pricing import horde_tax
from ledger.units import to_units
from tests.e2e import HordeClient, User


class Chromium:
    """A headless Chromium and one of its pages, spoken to over the DevTools protocol (a websocket)."""

    def __init__(self, profile: Path, log: Path) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("Chromium is not installed: run scripts/install.sh (it runs apt-get install chromium)")
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1280,1000", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self._ids = itertools.count(1)
        self.ws = self._connect(profile / "DevToolsActivePort")
        self.send("Runtime.enable")

    def _connect(self, port_file: Path) -> ClientConnection:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Chromium exited with {self.proc.returncode}; see {self._log.name}")
            if port_file.exists() and (port := port_file.read_text().split("\n")[0].strip()):
                try:
                    targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                except httpx.HTTPError:
                    targets = []
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            time.sleep(0.1)
        pytest.fail("Chromium did not open its DevTools port within 30 s")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self._ids)
        self.ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == call:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.1)
        body = self.evaluate("document.body ? document.body.outerHTML.slice(0, 3000) : ''")
        raise AssertionError(f"timed out waiting for {expression}; the page:\n{body}")

    def open(self, url: str) -> None:
        """Load ``url`` afresh (a new document even if only the fragment differs)."""
        self.send("Page.navigate", url="about:blank")
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.body.dataset.state")

    def screenshot(self, path: Path) -> None:
        height = self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=max(600, height), deviceScaleFactor=1,
                  mobile=False)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self._log.close()


@pytest.fixture
def browser(tmp_path: Path, horde: HordeClient) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path / "profile", horde.settings.state_dir / "logs" / "chromium.log")
    yield chromium
    chromium.close()


def _settle(horde: HordeClient, requester: User, owner: User, kudos: float, days_ago: int = 0) -> None:
    """A settled job: the requester pays ``kudos`` (plus tax) to the owner."""
    job_id, at = str(uuid.uuid4()), utcnow() - timedelta(days=days_ago)
    done = JobDone(job_id=job_id, request_id=job_id, requester_id=requester.id, worker_id=1, worker_owner_id=owner.id,
                   worker_name="page-gpu", model="tiny-e2e", kind="image", kudos=kudos, megapixelsteps=4.0,
                   finished_at=at)
    with horde.engine.begin() as conn:
        settle_job(conn, done, at)


def _bars(browser: Chromium, day: str) -> dict[str, str]:
    return dict(browser.evaluate(f"[...document.querySelectorAll('#flow-svg rect[data-day=\"{day}\"]')]"
                                 ".map(r => [r.getAttribute('class'), r.dataset.value])"))


def _kudos(value: float) -> str:
    return f"{value:,.2f}"


def test_an_admin_signs_in_and_sees_the_kudos_flow_and_top_earners_and_spenders(
        horde: HordeClient, browser: Chromium) -> None:
    admin = horde.user("page-admin")
    with horde.engine.begin() as conn:
        set_role(conn, admin.id, "admin", granted=True)
    earner, spender = horde.user("page-earner"), horde.user("page-spender", kudos=10)
    _settle(horde, spender, earner, 98_765.43)  # far above anything else the session's tests move
    _settle(horde, spender, earner, 1_000.00)
    others = [horde.user(f"page-user-{i}") for i in range(4)]
    for i, days_ago in enumerate((2, 5, 9, 16, 23)):  # earlier days of the period, so the flow has a shape
        _settle(horde, others[i % 4], others[(i + 1) % 4], 20_000.0 + 9_000 * i, days_ago=days_ago)

    browser.open(f"{_base(horde)}/admin")
    assert browser.evaluate("document.body.dataset.state") == "login"
    browser.evaluate(f"document.getElementById('apikey').value = {json.dumps(admin.apikey)};"
                     "document.getElementById('login-form').requestSubmit()")
    browser.wait_for("document.body.dataset.state === 'ready'")
    browser.screenshot(horde.settings.state_dir / "admin-page.png")

    top_earner = browser.evaluate("(() => { const r = document.querySelector('#earned-svg g.row');"
                                  " return [r.dataset.user, r.dataset.value, r.textContent]; })()")
    assert top_earner[0] == earner.account.username
    assert top_earner[1] == "99765.43" and _kudos(99_765.43) in top_earner[2]
    top_spender = browser.evaluate("(() => { const r = document.querySelector('#spent-svg g.row');"
                                   " return [r.dataset.user, r.dataset.value]; })()")
    spent = to_units(99_765.43) + to_units(horde_tax(98_765.43)) + to_units(horde_tax(1_000.00))
    assert top_spender == [spender.account.username, f"{spent / 100:.2f}"]

    # Each day's bars carry what the summary endpoint says about that day: real numbers from the ledger.
    since = (utcnow() - timedelta(days=29)).date()
    summary = horde.http.get("/api/v2/admin/ledger/summary", headers={"apikey": admin.apikey},
                             params={"group_by": "day", "since": f"{since}T00:00:00Z"}).json()
    days = {g["group"]: g for g in summary["groups"]}
    assert len(days) >= 6 and days[utcnow().date().isoformat()]["earned"] >= 99_765.43
    for day, row in days.items():
        assert _bars(browser, day) == {"earned": f"{row['earned']:.2f}", "spent": f"{row['spent']:.2f}"}, day
    assert browser.evaluate("document.querySelectorAll('#flow-svg g.bars rect.earned').length") == 30  # quiet days too
    assert _bars(browser, str(since - timedelta(days=1))) == {}
    cards = browser.evaluate("document.getElementById('totals').textContent")
    assert "balanced" in cards
    assert browser.evaluate("sessionStorage.getItem('horde.admin.apikey')") == admin.apikey

    browser.evaluate("const s = document.getElementById('days'); s.value = '7'; s.dispatchEvent(new Event('change'))")
    browser.wait_for("document.body.dataset.state === 'ready'"
                     " && document.querySelectorAll('#flow-svg g.bars rect.earned').length === 7")
    assert _bars(browser, str(utcnow().date() - timedelta(days=2)))["earned"] == "20000.00"
    browser.evaluate("document.getElementById('logout').click()")
    assert browser.evaluate("[document.body.dataset.state, sessionStorage.getItem('horde.admin.apikey')]") == [
        "login", None]


def test_a_key_without_the_admin_role_sees_the_refusal(horde: HordeClient, browser: Chromium) -> None:
    user = horde.user("page-nobody")
    browser.open(f"{_base(horde)}/admin#apikey={user.apikey}")
    browser.wait_for("document.body.dataset.state === 'denied'")
    browser.screenshot(horde.settings.state_dir / "admin-page-denied.png")
    error = browser.evaluate("document.getElementById('error').textContent")
    assert "admin role" in error and "NotAdmin" in error
    assert browser.evaluate("location.hash") == ""  # the key does not stay in the address
    assert browser.evaluate("document.getElementById('dashboard').hidden") is True
    assert browser.evaluate("document.querySelector('#flow-svg')") is None

    browser.open(f"{_base(horde)}/admin#apikey=not-a-key-of-anyone")
    browser.wait_for("document.body.dataset.state === 'denied'")
    assert "InvalidAPIKey" in browser.evaluate("document.getElementById('error').textContent")


def _base(horde: HordeClient) -> str:
    return f"http://{horde.settings.api_host}:{horde.settings.api_port}"
