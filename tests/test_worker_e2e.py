"""The worker program end to end, with real processes: the NSFW filter and the censorlist as the
requester sees them, img2img and inpainting through the API, a config file, the look-ahead that
keeps the device busy, and SIGTERM in the middle of a job."""

from __future__ import annotations

import base64
import io
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from config import Settings
from ledger.pricing import image_kudos
from tests.e2e import HordeClient
from tests.processes import Process, start_worker, wait_until

TINY = {"width": 64, "height": 64, "steps": 4}


def decode(data_b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data_b64)))
    assert image.format == "WEBP"
    return image.convert("RGB")


def black(image: Image.Image) -> bool:
    return image.getextrema() == ((0, 0), (0, 0), (0, 0))


def b64png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def worker_with_config(settings: Settings, name: str, config: str) -> Process:
    path = settings.state_dir / f"{name}.toml"
    path.write_text(config)
    worker = Process(f"worker-{name}", ["worker", "--config", str(path)], settings)
    worker.wait_for_log("asking for jobs", timeout=90)
    return worker


@pytest.fixture(scope="module")
def configured_worker(horde: HordeClient, settings: Settings, models_dir: Path) -> Iterator[Process]:
    """One worker started from a config file, serving the NSFW, censorlist and img2img test
    models. Its safety checker is the first served folder's: tiny-censorlist's, which flags every
    image it checks."""
    owner = horde.user("owner-configured")
    horde.register_worker("w-configured", owner)
    worker = worker_with_config(settings, "w-configured", f"""
name = "w-configured"
models_dir = "{models_dir}"
models = ["tiny-censorlist", "tiny-nsfw", "tiny-i2i"]
nsfw = true
censorlist = ["lighthouse"]
device = "cpu"
""")
    yield worker
    assert worker.stop() == 0


def test_flagged_images_are_censored_and_reported(horde: HordeClient, configured_worker: Process) -> None:
    requester = horde.user("prude", kudos=100)
    censored = horde.submit(requester, prompt="anything", models=["tiny-nsfw"], params=TINY, nsfw=False)
    allowed = horde.submit(requester, prompt="anything", models=["tiny-nsfw"], params=TINY, nsfw=True)
    status, uncensored = horde.wait_done(censored), horde.wait_done(allowed)
    worker = configured_worker
    [generation] = status["generations"]
    assert generation["censored"] is True and generation["state"] == "censored"
    assert generation["gen_metadata"] == [{"type": "censorship", "value": "nsfw"}]
    assert black(decode(generation["img"])) and decode(generation["img"]).size == (64, 64)
    [other] = uncensored["generations"]  # an NSFW request on a worker that allows it: not checked
    assert other["censored"] is False and other["state"] == "ok" and not black(decode(other["img"]))
    assert re.search(r"safety checker from \S+: [\d.]+ [MG]iB of cpu memory", worker.log())


def test_a_censorlist_from_the_config_file_switches_the_censor_on(horde: HordeClient,
                                                                  configured_worker: Process) -> None:
    listed = horde.submit(None, prompt="a Lighthouse at dusk", models=["tiny-censorlist"], params=TINY)
    clean = horde.submit(None, prompt="a harbour at dusk", models=["tiny-censorlist"], params=TINY)
    listed_status, clean_status = horde.wait_done(listed), horde.wait_done(clean)
    worker = configured_worker
    assert listed_status["generations"][0]["state"] == "censored"
    assert black(decode(listed_status["generations"][0]["img"]))
    assert clean_status["generations"][0]["state"] == "ok"
    assert "censorlist: 1 word(s)" in worker.log()


def test_img2img_and_inpainting_through_the_api(horde: HordeClient, configured_worker: Process) -> None:
    source = Image.new("RGBA", (128, 128), (220, 90, 30, 255))
    source.paste((0, 0, 0, 0), (0, 0, 64, 128))  # the left half transparent: what outpainting fills
    response = horde.http.post("/api/v2/generate/async", json={
        "prompt": "a harbour", "models": ["tiny-i2i"], "source_image": b64png(source),
        "source_processing": "img2img", "params": {**TINY, "denoising_strength": 0.5}})
    assert response.status_code == 202, response.text
    img2img = response.json()
    outpaint = horde.submit(None, prompt="a harbour", models=["tiny-i2i"], source_image=b64png(source),
                            source_processing="outpainting", params=TINY)
    mask = Image.new("L", (128, 128), 0)
    inpaint = horde.submit(None, prompt="a harbour", models=["tiny-i2i"],
                           source_image=b64png(source.convert("RGB")), source_mask=b64png(mask),
                           source_processing="inpainting", params=TINY)
    statuses = [horde.wait_done(r) for r in (img2img["id"], outpaint, inpaint)]
    worker = configured_worker
    assert img2img["kudos"] == image_kudos(width=64, height=64, steps=4, img2img=True)
    for status in statuses:
        [generation] = status["generations"]
        assert generation["state"] == "ok" and decode(generation["img"]).size == (64, 64)
    log = worker.log()
    assert "generated img2img 64x64" in log and log.count("generated inpainting 64x64") == 2


@pytest.mark.parametrize(("body", "message"), [
    ({"source_image": "not base64!"}, "not valid base64"),
    ({"source_image": base64.b64encode(b"not an image").decode()}, "not an image"),
    ({"source_image": "https://example.org/cat.png"}, "does not fetch URLs"),
    ({"source_mask": b64png(Image.new("L", (64, 64)))}, "source_mask needs a source_image"),
    ({"source_image": b64png(Image.new("RGB", (64, 64))), "source_processing": "inpainting"},
     "inpainting needs a source_mask or a source_image with transparency"),
])
def test_bad_source_images_are_refused_at_submission(horde: HordeClient, body: dict, message: str) -> None:
    before = horde.count_jobs()
    response = horde.http.post("/api/v2/generate/async",
                               json={"prompt": "x", "models": ["tiny-i2i"], "params": TINY, **body})
    assert response.status_code == 400 and response.json()["rc"] == "BadRequest"
    assert message in response.json()["message"]
    assert horde.count_jobs() == before


def _first_line(log: str, pattern: str) -> int:
    for number, line in enumerate(log.splitlines()):
        if re.search(pattern, line):
            return number
    raise AssertionError(f"no line matches {pattern!r}")


def test_the_next_job_is_offered_and_decoded_while_one_generates(horde: HordeClient, settings: Settings,
                                                                  models_dir: Path) -> None:
    owner = horde.user("owner-lookahead")
    horde.register_worker("w-lookahead", owner)
    worker = start_worker(settings, "w-lookahead", ["tiny-lookahead"], models_dir)
    try:
        # Submitted to a running worker, so that no aged copy (republished at a higher tier while
        # waiting) gets in between.
        first = horde.submit(None, prompt="first", models=["tiny-lookahead"], params={**TINY, "steps": 150})
        # Long enough to measure its speed (the first generation warms up and is not measured).
        second = horde.submit(None, prompt="second", models=["tiny-lookahead"], params={**TINY, "steps": 100})
        horde.wait_done(first)
        horde.wait_done(second)
        # Now the worker knows its speed: it asks for the next job while the one before still generates.
        more = [horde.submit(None, prompt=f"more {i}", models=["tiny-lookahead"], params={**TINY, "steps": 60})
                for i in range(6)]
        for request_id in more:
            horde.wait_done(request_id)
    finally:
        worker.stop()
    log = worker.log()
    first_job, second_job = horde.job_rows(first)[0].id, horde.job_rows(second)[0].id
    # The worker's first job: no speed measured yet, so it asks for the second once the first is done.
    assert _first_line(log, f"job={second_job} offered") > _first_line(log, f"job={first_job} generated")
    assert re.search(rf"job={first_job} timings ms: decode [\d.]+, claim [\d.]+, ack [\d.]+", log)
    ahead = [job for request_id in more if f"job={(job := horde.job_rows(request_id)[0].id)} offered ahead" in log]
    assert ahead, "no job offered ahead"
    for job in ahead:  # offered (leased) and decoded while another generated, generated only after it
        assert _first_line(log, f"job={job} offered ahead") < _first_line(log, f"job={job} generated")
        row = next(r for rid in more for r in horde.job_rows(rid) if r.id == job)
        assert row.state == "done" and row.attempts == 0


def test_sigterm_mid_job_finishes_it_and_returns_the_next(horde: HordeClient, settings: Settings,
                                                          models_dir: Path) -> None:
    """The job in hand is finished and paid; the one offered ahead while it ran is given back
    unstarted (queued again, no attempt spent), and another worker does it. Nothing is lost,
    nothing is paid twice."""
    requester = horde.user("patient-sigterm", kudos=100)
    owner1, owner2 = horde.user("owner-sigterm-1"), horde.user("owner-sigterm-2")
    horde.register_worker("w-sigterm-1", owner1)
    horde.register_worker("w-sigterm-2", owner2)
    worker = start_worker(settings, "w-sigterm-1", ["tiny-sigterm"], models_dir)
    # Two warm-ups (the first is not measured) teach it its speed, so that it asks for the next job
    # ahead, a quarter of the slow job before its expected end. At 50 steps a job's fixed cost
    # (~0.45 s here) made the 400-step job's estimate ~35% too long, so the ask came after the job
    # ended about one run in three; at 200 steps the estimate is within ~10%.
    warm_ups = [horde.submit(requester, prompt="warm-up", models=["tiny-sigterm"],
                             params={**TINY, "width": 128, "height": 128, "steps": 200}) for _ in range(2)]
    for request_id in warm_ups:
        horde.wait_done(request_id)
    in_hand = horde.submit(requester, prompt="slow", models=["tiny-sigterm"], params={**TINY, "width": 128, "height": 128, "steps": 400})
    waiting = horde.submit(requester, prompt="next", models=["tiny-sigterm"], params=TINY)
    job_in_hand, job_waiting = horde.job_rows(in_hand)[0].id, horde.job_rows(waiting)[0].id
    wait_until(lambda: f"job={job_waiting} offered ahead" in worker.log(), 60, "the next job to be offered", worker)
    assert horde.job_rows(in_hand)[0].state == "claimed"
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(60) == 0
    log = worker.log()
    assert f"job={job_in_hand} published job-completed.v1" in log
    assert f"job={job_waiting} giving the job back unstarted (stopping" in log
    assert f"job={job_waiting} given back (given back; queued again)" in log
    assert horde.job_rows(in_hand)[0].state == "done"
    assert horde.job_rows(waiting)[0].state == "queued" and horde.job_rows(waiting)[0].attempts == 0
    survivor = start_worker(settings, "w-sigterm-2", ["tiny-sigterm"], models_dir)
    try:
        done = horde.wait_done(waiting)
    finally:
        survivor.stop()
    assert done["generations"][0]["worker_name"] == "w-sigterm-2"
    assert horde.wait_done(in_hand)["generations"][0]["worker_name"] == "w-sigterm-1"
    prices = [horde.job_rows(r)[0].price / 100 for r in (in_hand, waiting)]
    horde.wait_balance(owner1, prices[0] + sum(horde.job_rows(r)[0].price / 100 for r in warm_ups))
    horde.wait_balance(owner2, prices[1])
    assert all(len(horde.ledger_entries(horde.job_rows(r)[0].id)) == 4 for r in (in_hand, waiting))
