"""Owners' priority lists (issue 5): which workers get a priority copy of a user's job."""

from __future__ import annotations

from api.owner_priority import PriorityWorker, user_id_of, workers_for


def test_user_id_of_reads_alias_hash_id() -> None:
    assert user_id_of("alice#12") == 12
    assert user_id_of("#7") == 7
    assert user_id_of("bob") is None
    assert user_id_of("bob#x1") is None
    assert user_id_of("bob#١٢") is None  # non-ASCII digits are not an id


def test_only_workers_listing_the_user_and_serving_a_model() -> None:
    table = [
        PriorityWorker("w-a", frozenset({"sd15"}), frozenset({1, 2})),
        PriorityWorker("w-b", frozenset({"sdxl"}), frozenset({1})),
        PriorityWorker("w-c", frozenset({"sd15", "sdxl"}), frozenset({3})),
    ]
    assert workers_for(table, 1, ["sd15"]) == ["w-a"]
    assert workers_for(table, 1, ["sd15", "sdxl"]) == ["w-a", "w-b"]
    assert workers_for(table, 2, ["sdxl"]) == []
    assert workers_for(table, 3, ["sdxl"]) == ["w-c"]
    assert workers_for(table, 4, ["sd15"]) == []


def test_a_request_for_any_model_goes_to_every_listing_worker() -> None:
    table = [PriorityWorker("w-a", frozenset({"sd15"}), frozenset({1})),
             PriorityWorker("w-b", frozenset(), frozenset({1}))]
    assert workers_for(table, 1, []) == ["w-a", "w-b"]


# --- end to end: a registered worker serves its owner's chosen users first ---------------------

TINY = {"width": 64, "height": 64, "steps": 4}


def test_owner_serves_chosen_users_first_on_own_worker(horde, settings, models_dir) -> None:  # type: ignore[no-untyped-def]
    import time

    from tests.processes import start_worker

    owner, friend = horde.user("prio-owner"), horde.user("prio-friend")
    rich, stranger = horde.user("prio-rich", kudos=100_000), horde.user("prio-stranger")
    answer = horde.http.post("/api/v2/workers", json={"name": "prio-gpu", "models": ["tiny-ownprio"]},
                             headers={"apikey": owner.apikey})
    assert answer.status_code == 201, answer.text
    worker_id, amqp_url = answer.json()["id"], answer.json()["amqp_url"]
    # Only the owner may name the users it serves first.
    body = {"priority_usernames": [friend.account.username]}
    assert horde.http.put(f"/api/v2/workers/{worker_id}", json=body,
                          headers={"apikey": friend.apikey}).status_code == 403
    changed = horde.http.put(f"/api/v2/workers/{worker_id}", json=body, headers={"apikey": owner.apikey})
    assert changed.status_code == 200, changed.text
    time.sleep(5.5)  # the API re-reads the lists every 5 s, in the background

    # A congested queue: the rich user's jobs are ahead by tier, the friend's and the stranger's
    # (no kudos, lowest tier) come last.
    backlog = [horde.submit(rich, prompt=f"rich {i}", models=["tiny-ownprio"], params=TINY) for i in range(6)]
    time.sleep(0.5)  # the first submission started the refresh; let it land
    backlog += [horde.submit(rich, prompt=f"rich late {i}", models=["tiny-ownprio"], params=TINY) for i in range(2)]
    favoured = horde.submit(friend, prompt="a friend's job", models=["tiny-ownprio"], params=TINY)
    ordinary = horde.submit(stranger, prompt="a stranger's job", models=["tiny-ownprio"], params=TINY)

    worker = start_worker(settings, "prio-gpu", ["tiny-ownprio"], models_dir, amqp_url=amqp_url)
    try:
        for request_id in [*backlog, favoured, ordinary]:
            assert horde.wait_done(request_id)["finished"] == 1
    finally:
        worker.stop()
    order = sorted([*backlog, favoured, ordinary], key=lambda rid: horde.job_rows(rid)[0].finished_at)
    # The friend's job jumps the queue (at most the one job the worker met before it); the
    # stranger's, same tier, waits behind the rich user's.
    assert order.index(favoured) <= 1, order.index(favoured)
    assert order.index(ordinary) >= len(backlog), order.index(ordinary)
    # Done and settled once, whichever of its two copies was claimed: four entries (debit, credit, tax).
    job_id = horde.job_rows(favoured)[0].id
    deadline = time.monotonic() + 30
    while len(horde.ledger_entries(job_id)) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a second settlement, if there were one, would land now
    assert len(horde.ledger_entries(job_id)) == 4
    assert str(horde.job_rows(favoured)[0].worker_id) == str(worker_id)
