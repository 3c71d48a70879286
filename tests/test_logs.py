"""Structured logs: ``HORDE_LOG_FORMAT=json`` gives one JSON object per line, with ``job_id`` on job lines."""

from __future__ import annotations

import json
import logging
import re

import pytest

from cli.logs import setup_logging, uvicorn_log_config
from config import Settings
from consumers.worker import JobLog
from tests.e2e import HordeClient
from tests.processes import start_worker, wait_until

_PROGRESS_BAR = re.compile(r"^[^{].*\|.*\d+/\d+ \[")
JOB = "5b0c2a4e-8f1d-4c39-9d0e-2f6a1b7c3d45"


@pytest.fixture
def restore_logging():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(text: str, *, skip_progress_bars: bool = False) -> list[dict]:  # type: ignore[type-arg]
    """Every line as JSON; fails on one that is not. ``skip_progress_bars``: the worker's model-loading
    bars (tqdm, on a terminal's stderr) are not log lines and are left out."""
    lines = []
    for line in text.splitlines():
        if skip_progress_bars and _PROGRESS_BAR.search(line):
            continue
        if line.strip():
            try:
                lines.append(json.loads(line))
            except ValueError as exc:
                raise AssertionError(f"not a JSON log line: {line!r}") from exc
    return lines


def test_json_lines_carry_the_job_id_however_the_code_names_the_job(capsys, restore_logging) -> None:
    setup_logging("INFO", "horde-test", "json")
    logging.getLogger("api.claims").info("job %s: leased to %s", JOB, "w1")  # the API services' style
    JobLog(logging.getLogger("consumers.worker"), {"job_id": JOB}).info("received model=%s", "tiny-sd")
    logging.getLogger("api.other").warning("stored", extra={"job_id": JOB})
    logging.getLogger("api.app").info("API ready on %s", "http://127.0.0.1:1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("api.results").exception("job %s: result not processed", JOB)
    lines = json_lines(capsys.readouterr().err)
    assert [line.get("job_id") for line in lines] == [JOB, JOB, JOB, None, JOB]
    leased, received, stored, ready, failed = lines
    assert leased["message"] == f"job {JOB}: leased to w1" and leased["level"] == "INFO"
    assert leased["logger"] == "api.claims" and leased["process"] == "horde-test" and isinstance(leased["pid"], int)
    assert received["message"] == f"job={JOB} received model=tiny-sd"
    assert stored["level"] == "WARNING"
    assert "job_id" not in ready and ready["time"].endswith("+00:00")
    assert "RuntimeError: boom" in failed["exception"]


def test_text_stays_the_default_and_unknown_formats_are_refused(capsys, restore_logging, monkeypatch) -> None:
    monkeypatch.delenv("HORDE_LOG_FORMAT", raising=False)
    setup_logging("INFO", "horde-test")
    logging.getLogger("api.claims").info("job %s: leased", JOB)
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(f"horde-test INFO api.claims: job {JOB}: leased")
    monkeypatch.setenv("HORDE_LOG_FORMAT", "json")
    setup_logging("INFO", "horde-test")
    logging.getLogger("api.claims").info("job %s: leased", JOB)
    assert json_lines(capsys.readouterr().err)[0]["job_id"] == JOB
    with pytest.raises(ValueError, match="log format 'xml'"):
        setup_logging("INFO", "horde-test", "xml")


def test_uvicorn_log_config_gives_uvicorn_and_the_api_the_same_json_lines(capsys, restore_logging) -> None:
    """What ``uvicorn.run(log_config=…)`` applies in each API worker process."""
    import logging.config

    uvicorn_logger = logging.getLogger("uvicorn.error")
    state = uvicorn_logger.handlers[:], uvicorn_logger.propagate, logging.getLogger("uvicorn").handlers[:]
    try:
        logging.config.dictConfig(uvicorn_log_config("INFO", "horde-api", "json"))
        uvicorn_logger.info("Started server process [%d]", 42)
        logging.getLogger("api.claims").info("job %s: leased to %s", JOB, "w1")
        logging.getLogger("aiormq.connection").error("a reconnect traceback nobody needs")
        lines = json_lines(capsys.readouterr().err)
    finally:
        uvicorn_logger.handlers[:], uvicorn_logger.propagate, logging.getLogger("uvicorn").handlers[:] = state
    assert [(line["logger"], line.get("job_id")) for line in lines] == [("uvicorn.error", None), ("api.claims", JOB)]
    assert {line["process"] for line in lines} == {"horde-api"}


def test_a_real_worker_logs_json_with_the_job_id(horde: HordeClient, settings: Settings, models_dir) -> None:
    owner = horde.user("logs-owner")
    horde.register_worker("w-logs", owner)
    worker = start_worker(settings.model_copy(update={"log_format": "json"}), "w-logs", ["tiny-logs"], models_dir)
    try:
        request_id = horde.submit(None, prompt="a logged lighthouse", models=["tiny-logs"],
                                  params={"width": 64, "height": 64, "steps": 4})
        horde.wait_done(request_id)
        [job] = horde.job_rows(request_id)
        wait_until(lambda: sum(job.id == line.get("job_id")
                               for line in json_lines(worker.log(), skip_progress_bars=True)) >= 2,
                   15, "the worker's lines about the job", worker)
    finally:
        worker.stop()
    lines = json_lines(worker.log(), skip_progress_bars=True)  # every log line parses as JSON
    about_job = [line for line in lines if line.get("job_id") == job.id]
    assert all(job.id in line["message"] for line in about_job)
    assert {line["process"] for line in lines} == {"horde-worker"}
    # No line that names this job at its start lacks the field.
    assert not [line for line in lines if line["message"].startswith(f"job={job.id}") and "job_id" not in line]
