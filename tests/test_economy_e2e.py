"""The economy seen from outside: priority under congestion, and aging so that nobody starves."""

from __future__ import annotations

import statistics
import time


from broker.topology import job_queue
from config import Settings
from tests import services
from tests.e2e import HordeClient
from tests.processes import start_worker, wait_until

TINY = {"width": 64, "height": 64, "steps": 4}


def test_a_waiting_job_ages_to_a_higher_tier_and_is_republished(horde: HordeClient, settings: Settings) -> None:
    request_id = horde.submit(None, prompt="patience", models=["tiny-age"], params=TINY)
    [job] = horde.job_rows(request_id)
    assert job.tier == 0  # anonymous
    wait_until(lambda: horde.job_rows(request_id)[0].tier >= 1, settings.aging_seconds * 3, "the job to age")
    time.sleep(settings.aging_seconds / 4)  # several reconciler ticks: one step of waiting is one tier, not more
    assert horde.job_rows(request_id)[0].tier == 1
    # The aged copy is in the queue beside the original; whichever comes first wins the claim.
    assert services.queue_depth(settings.rabbitmq_url, job_queue("tiny-age")) >= 2


def test_under_congestion_richer_requesters_are_served_earlier_and_anonymous_still_served(
        horde: HordeClient, settings: Settings, models_dir) -> None:
    medium = horde.user("medium", kudos=1_500)  # tier 2
    rich = horde.user("wealthy", kudos=150_000)  # tier 4
    owner = horde.user("owner-congest")
    horde.register_worker("w-congest", owner)
    submitted: dict[str, str] = {}
    for i in range(8):  # interleaved, so arrival order favours nobody
        submitted[horde.submit(None, prompt=f"anon {i}", models=["tiny-congest"], params=TINY)] = "anonymous"
        submitted[horde.submit(medium, prompt=f"medium {i}", models=["tiny-congest"], params=TINY)] = "medium"
        submitted[horde.submit(rich, prompt=f"rich {i}", models=["tiny-congest"], params=TINY)] = "rich"
    worker = start_worker(settings, "w-congest", ["tiny-congest"], models_dir)
    try:
        for request_id in submitted:
            assert horde.wait_done(request_id)["finished"] == 1  # everyone is served, anonymous too
    finally:
        worker.stop()
    finished = sorted(submitted, key=lambda rid: horde.job_rows(rid)[0].finished_at)
    rank = {rid: position for position, rid in enumerate(finished)}
    mean = {group: statistics.mean(rank[r] for r, g in submitted.items() if g == group)
            for group in ("rich", "medium", "anonymous")}
    assert mean["rich"] < mean["medium"] < mean["anonymous"], mean


def test_trusted_workers_only_requests_go_only_to_trusted_workers(
        horde: HordeClient, settings: Settings, models_dir) -> None:
    from api.roles import set_role

    stranger, trusted = horde.user("stranger-owner"), horde.user("trusted-owner")
    with horde.engine.begin() as conn:
        set_role(conn, trusted.id, "trusted", granted=True)
    horde.register_worker("w-stranger", stranger)
    horde.register_worker("w-trusted", trusted)
    careful = horde.submit(None, prompt="only trusted", models=["tiny-trusted"], params=TINY, trusted_workers=True)
    ordinary = horde.submit(None, prompt="anyone", models=["tiny-trusted"], params=TINY)
    untrusted_worker = start_worker(settings, "w-stranger", ["tiny-trusted"], models_dir)
    try:
        # The untrusted worker serves the ordinary job (nothing blocks behind the careful one)…
        assert horde.wait_done(ordinary)["generations"][0]["worker_name"] == "w-stranger"
        time.sleep(settings.republish_after_seconds * 2)  # …and never the careful one, however often it comes by.
        assert horde.job_rows(careful)[0].state == "queued"
        trusted_worker = start_worker(settings, "w-trusted", ["tiny-trusted"], models_dir)
        try:
            assert horde.wait_done(careful, timeout=60)["generations"][0]["worker_name"] == "w-trusted"
        finally:
            trusted_worker.stop()
    finally:
        untrusted_worker.stop()
