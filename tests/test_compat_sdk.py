"""Compatibility: horde-sdk from PyPI, unmodified, against the running horde.

The SDK needs Python >= 3.12, so its code (tests/sdk/flows.py) runs as a subprocess in its own
environment, ``.venv-sdk`` (scripts/install-sdk.sh, run by scripts/test.sh), pointed at the horde
with ``AI_HORDE_URL`` as any SDK user would. ``TESTS_ONGOING`` is set for it: the SDK then
refuses any response field it does not know, so every answer must match its models exactly.
Text flows run without it: a text generation's ``id``, which AI Horde sends, is not in the SDK's
model (it has no alias there), so in that mode the SDK would refuse AI Horde's own answers too.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from tests.e2e import HordeClient
from tests.processes import REPO, start_worker

SDK_PYTHON = REPO / ".venv-sdk" / "bin" / "python"
FLOWS = REPO / "tests" / "sdk" / "flows.py"
TINY = {"width": 64, "height": 64, "steps": 4}

Sdk = Callable[..., Any]


class SdkRunner:
    def __init__(self, settings: Settings, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AI_HORDE", "HORDE_"))}
        self.env.update(AI_HORDE_URL=f"http://{settings.api_host}:{settings.api_port}/api/", TESTS_ONGOING="1",
                        HORDE_SDK_LOG_VERBOSITY="30", PYTHONUNBUFFERED="1")

    def argv(self, flow: str, args: dict[str, Any]) -> list[str]:
        return [str(SDK_PYTHON), str(FLOWS), flow, json.dumps(args)]

    def __call__(self, flow: str, timeout: float = 180, strict: bool = True, **args: Any) -> Any:
        env = self.env if strict else {k: v for k, v in self.env.items() if k != "TESTS_ONGOING"}
        proc = subprocess.run(self.argv(flow, args), cwd=self.cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        return self.result(flow, proc.returncode, proc.stdout, proc.stderr)

    def start(self, flow: str, **args: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(flow, args), cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(self, flow: str, proc: subprocess.Popen[str], timeout: float = 120) -> Any:
        stdout, stderr = proc.communicate(timeout=timeout)
        return self.result(flow, proc.returncode, stdout, stderr)

    @staticmethod
    def result(flow: str, returncode: int, stdout: str, stderr: str) -> Any:
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if returncode != 0 or not lines:
            raise AssertionError(f"SDK flow {flow} failed (exit {returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}")
        return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def sdk(horde: HordeClient, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkRunner]:
    if not SDK_PYTHON.exists():
        # Missing work must not pass as a skip: scripts/test.sh installs it, so say how and fail.
        pytest.fail("horde-sdk environment .venv-sdk missing: run scripts/install-sdk.sh (needs Python >= 3.12)")
    yield SdkRunner(settings, tmp_path_factory.mktemp("sdk"))  # the SDK writes logs/ into its cwd


def test_heartbeat_and_models(sdk: SdkRunner) -> None:
    beat = sdk("heartbeat")
    assert beat["message"] == "OK" and beat["version"] and beat["again"] == beat["version"]
    models = sdk("models")
    image = {m["name"]: m for m in models["image"]}
    assert "tiny-sdk" in image and {m["type"] for m in models["image"]} == {"image"}
    assert all(isinstance(m["count"], int) and isinstance(m["eta"], int) for m in models["image"])
    assert "tiny-gpt2" in {m["name"] for m in models["text"]} and {m["type"] for m in models["text"]} == {"text"}
    assert all(m["count"] >= 1 for m in models["min_count_1"])
    assert sdk("performance")["worker_count"] >= 0


def test_dry_run_quotes_what_a_request_costs(horde: HordeClient, sdk: SdkRunner) -> None:
    quote = sdk("dry_run", model="tiny-sdk", n=2, **TINY)
    direct = horde.http.post("/api/v2/generate/async", json={
        "prompt": "x", "models": ["tiny-sdk"], "params": {**TINY, "n": 2}, "dry_run": True})
    assert direct.status_code == 200 and quote["kudos"] == direct.json()["kudos"] > 0


def test_image_generation_end_to_end_served_by_a_real_worker(
        horde: HordeClient, settings: Settings, models_dir: Path, sdk: SdkRunner) -> None:
    requester = horde.user("sdk-requester", kudos=500)
    owner = horde.user("sdk-gpu-owner")
    horde.register_worker("w-sdk", owner)
    worker = start_worker(settings, "w-sdk", ["tiny-sdk"], models_dir)
    try:
        result = sdk("image", apikey=requester.apikey, model="tiny-sdk", seed="777", **TINY)
    finally:
        worker.stop()
    assert result["done"] and result["finished"] == 1
    [generation] = result["generations"]
    assert generation["format"] == "WEBP" and generation["size"] == [64, 64]
    assert generation["seed"] == "777" and generation["model"] == "tiny-sdk"
    assert generation["worker_name"] == "w-sdk" and generation["state"] == "ok" and not generation["censored"]
    [job] = horde.job_rows(result["request_id"])
    horde.wait_balance(owner, job.price / 100)


def test_cancel_through_the_sdk(horde: HordeClient, sdk: SdkRunner) -> None:
    requester = horde.user("sdk-canceller", kudos=50)
    result = sdk("cancel", apikey=requester.apikey, model="tiny-sdk-http", n=2, **TINY)
    assert result["waiting_before"] == 2
    assert result["done"] and result["waiting"] == 0 and result["generations"] == 0 and result["again_done"]
    assert {row.state for row in horde.job_rows(result["request_id"])} == {"cancelled"}
    assert horde.balance(requester) == 50


def test_find_user_users_and_leaderboard(horde: HordeClient, sdk: SdkRunner) -> None:
    user = horde.user("sdk-findme", kudos=987_654_321)
    horde.register_worker("w-sdk-findme", user)
    found = sdk("find_user", apikey=user.apikey)
    assert found["id"] == user.id and found["username"] == f"sdk-findme#{user.id}"
    assert found["kudos"] == 987_654_321 and found["kudos_details"]["admin"] == 987_654_321
    assert len(found["worker_ids"]) == 1 and found["worker_ids"][0].isdigit()
    assert found["public_username"] == found["username"] and found["public_worker_ids"] is None
    assert found["leaderboard"][0] == found["username"]  # the richest user of this session


def test_transfer_through_the_sdk(horde: HordeClient, sdk: SdkRunner) -> None:
    giver, taker = horde.user("sdk-giver", kudos=40), horde.user("sdk-taker")
    assert sdk("transfer", apikey=giver.apikey, username=taker.account.username, amount=15)["transferred"] == 15
    assert horde.balance(giver) == 25 and horde.balance(taker) == 15


@pytest.mark.parametrize("case, words", [
    ("unknown_model", "unknown image model"),
    ("unknown_request", "no request"),
    ("unknown_user", "no user"),
    ("invalid_key", "no user"),
    ("transfer_to_self", "yourself"),
    ("transfer_from_anonymous", "anonymous"),
    ("anonymous_worker", "anonymous"),
])
def test_errors_surface_cleanly_in_the_sdk(horde: HordeClient, sdk: SdkRunner, case: str, words: str) -> None:
    user = horde.user(f"sdk-err-{case}")
    result = sdk("error", case=case, apikey=user.apikey, username=user.account.username)
    assert result["raised"] == "AIHordeRequestError", result
    assert words in result["message"].lower(), result


def test_http_worker_made_of_sdk_classes_completes_jobs(horde: HordeClient, sdk: SdkRunner) -> None:
    requester = horde.user("sdk-http-requester", kudos=100)
    owner = horde.user("sdk-http-owner")
    worker = sdk.start("http_worker", apikey=owner.apikey, name="SDK HTTP Worker", models=["tiny-sdk-http"], jobs=2)
    try:
        result = sdk("image", apikey=requester.apikey, model="tiny-sdk-http", n=2, prompt="a fox ### blur", **TINY)
        served = sdk.finish("http_worker", worker)
    finally:
        worker.kill()
    assert result["done"] and result["finished"] == 2
    assert {g["format"] for g in result["generations"]} == {"WEBP"}  # the worker sent PNG
    assert {g["worker_name"] for g in result["generations"]} == {"SDK HTTP Worker"}
    jobs = served["jobs"]
    assert len(jobs) == 2 and all(j["reward"] > 0 and j["model"] == "tiny-sdk-http" for j in jobs)
    assert all(j["prompt"] == "a fox ### blur" and j["steps"] == 4 and j["ttl"] > 0 for j in jobs)
    assert {j["id"] for j in jobs} == {g["id"] for g in result["generations"]}
    horde.wait_balance(owner, sum(j["reward"] for j in jobs))
    listed = sdk("workers")
    mine = [w for w in listed["workers"] if w["name"] == "SDK HTTP Worker"]
    assert mine and mine[0]["online"] and mine[0]["models"] == ["tiny-sdk-http"] and mine[0]["type"] == "image"
    assert mine[0]["requests_fulfilled"] == 2


def test_text_generation_end_to_end_served_by_a_real_worker(
        horde: HordeClient, settings: Settings, models_dir: Path, sdk: SdkRunner) -> None:
    requester = horde.user("sdk-text-requester", kudos=500)
    owner = horde.user("sdk-text-owner")
    horde.register_worker("w-sdk-text", owner)
    worker = start_worker(settings, "w-sdk-text", ["tiny-text-sdk"], models_dir)
    try:
        result = sdk("text", strict=False, apikey=requester.apikey, model="tiny-text-sdk", max_length=16)
    finally:
        worker.stop()
    [generation] = result["generations"]
    assert result["finished"] == 1 and isinstance(generation["text"], str)
    assert generation["model"] == "tiny-text-sdk" and generation["worker_name"] == "w-sdk-text"
    [job] = horde.job_rows(result["request_id"])
    horde.wait_balance(owner, job.price / 100)


def test_text_http_worker_made_of_sdk_classes_completes_jobs(horde: HordeClient, sdk: SdkRunner) -> None:
    requester, owner = horde.user("sdk-text-http-requester", kudos=100), horde.user("sdk-text-http-owner")
    worker = sdk.start("text_http_worker", apikey=owner.apikey, name="SDK Kobold Worker",
                       models=["tiny-text-sdk-http"], jobs=1, reply=" and the sea was calm.")
    try:
        result = sdk("text", strict=False, apikey=requester.apikey, model="tiny-text-sdk-http", prompt="It was night",
                     max_length=20)
        served = sdk.finish("text_http_worker", worker)
    finally:
        worker.kill()
    [generation] = result["generations"]
    assert generation["text"] == " and the sea was calm." and generation["worker_name"] == "SDK Kobold Worker"
    [job] = served["jobs"]
    assert job["prompt"] == "It was night" and job["max_length"] == 20 and job["reward"] > 0
    horde.wait_balance(owner, job["reward"])
