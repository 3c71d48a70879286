"""The economy seen from outside: priority under congestion, and aging so that nobody starves."""

from __future__ import annotations

import statistics


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
