"""The broker watchdog's rules (api.watchdog.judge): pure, over snapshots of the management API."""

from __future__ import annotations

from collections.abc import Mapping

from api.watchdog import (
    ChannelTrace,
    ChannelView,
    ConsumerView,
    Snapshot,
    Verdict,
    WorkerView,
    channel_views,
    judge,
)

LEASE = 150.0
SETTLE = 15.0
ALICE = WorkerView(id=1, name="alice", owner_id=10, amqp_user="w-alice", queues=2)
WORKERS = {"w-alice": ALICE}
MODEL_QUEUE = "horde.jobs.sd"


def honest(**changes: object) -> ChannelView:
    """The honest worker's one channel: prefetch 1, one consumer on its model's queue, the claim
    replies' no-ack consumer, every delivery acked."""
    fields: dict[str, object] = dict(
        name="c1 (1)", connection="c1", user="w-alice", prefetch=1, unacked=1, delivered=11, acked=10,
        consumers=(ConsumerView(MODEL_QUEUE), ConsumerView("amq.rabbitmq.reply-to", ack_required=False)))
    fields.update(changes)
    return ChannelView(**fields)  # type: ignore[arg-type]


def run(*channels: ChannelView, at: float = 1000.0, memory: Mapping[str, ChannelTrace] | None = None,
        workers: Mapping[str, WorkerView] = WORKERS) -> tuple[list[Verdict], dict[str, ChannelTrace]]:
    return judge(Snapshot(at=at, channels=channels, workers=workers), memory or {}, trusted=["guest"],
                 lease_seconds=LEASE, settle_seconds=SETTLE)


def reasons(*channels: ChannelView, **kwargs: object) -> list[str]:
    verdicts, _ = run(*channels, **kwargs)  # type: ignore[arg-type]
    return [r for v in verdicts for r in v.reasons]


def test_an_honest_worker_is_left_alone() -> None:
    assert reasons(honest()) == []
    assert reasons(honest(unacked=0, delivered=10)) == []


def test_an_exclusive_consumer_is_ejected() -> None:
    [reason] = reasons(honest(consumers=(ConsumerView(MODEL_QUEUE, exclusive=True),)))
    assert reason.startswith(f"exclusive consumer on {MODEL_QUEUE}")


def test_a_prefetch_other_than_one_is_ejected() -> None:
    [unlimited] = reasons(honest(consumers=(ConsumerView(MODEL_QUEUE, prefetch=0),)))
    assert unlimited.startswith(f"prefetch 0 on {MODEL_QUEUE} (unlimited)")
    # Its deliveries outrun the lagging unacked gauge: it holds them, which is no proof of a drop.
    [hoarding] = reasons(honest(unacked=0, delivered=14, acked=10, consumers=(ConsumerView(MODEL_QUEUE, prefetch=0),)))
    assert hoarding.startswith(f"prefetch 0 on {MODEL_QUEUE} (unlimited)")
    [two] = reasons(honest(consumers=(ConsumerView(MODEL_QUEUE, prefetch=2),)))
    assert two.startswith(f"prefetch 2 on {MODEL_QUEUE}")
    # The channel's own figure lags (a fresh channel shows 0 until its next stats emission): the
    # consumers' prefetch, fixed when they subscribed, is what counts.
    assert reasons(honest(prefetch=0)) == []


def test_consuming_or_getting_without_acks_is_ejected() -> None:
    [no_ack] = reasons(honest(consumers=(ConsumerView(MODEL_QUEUE, ack_required=False),)))
    assert no_ack.startswith(f"consumes {MODEL_QUEUE} without acks")
    [gets] = reasons(honest(gets_no_ack=3))
    assert gets.startswith("took 3 messages with basic.get without acks")


def test_more_unacked_deliveries_than_queues_is_hoarding() -> None:
    [reason] = reasons(honest(unacked=3, delivered=13))
    assert reason == "holds 3 unacked deliveries, more than its 2 queues"
    # Counted over all its channels, and from its consumers when its models are not known.
    unknown = {"w-alice": WorkerView(id=1, name="alice", owner_id=10, amqp_user="w-alice")}
    second = honest(name="c2 (1)", connection="c2", unacked=1, delivered=1, acked=0)
    assert reasons(honest(), second, workers=unknown) == []  # 2 held, 1 queue consumed + its own
    third = honest(name="c3 (1)", connection="c3", unacked=1, delivered=1, acked=0)
    assert reasons(honest(), second, third, workers=unknown) == [
        "holds 3 unacked deliveries, more than its 2 queues"]


def test_deliveries_settled_without_ack_beyond_the_gauges_lag_are_drops_at_once() -> None:
    # One consumer: the unacked gauge may lag by one delivery; three missing acks cannot be lag.
    [reason] = reasons(honest(unacked=0, delivered=13, acked=10))
    assert reason.startswith("settled 3 deliveries without acking them (13 delivered, 10 acked, 0 unacked)")
    assert reasons(honest(unacked=0, delivered=11, acked=10)) == []  # one: maybe the gauge's lag


def test_no_drop_is_judged_at_once_before_the_channels_consumers_are_listed() -> None:
    # The consumer listing may lag the channel counters: with no consumer seen, what the channel may
    # hold is unknown, so a fresh channel's first deliveries are not called drops (the quiet-channel
    # rule still judges them later if they never get acked).
    assert reasons(honest(unacked=0, delivered=4, acked=0, consumers=())) == []


def test_a_single_drop_is_judged_once_the_channel_has_been_quiet() -> None:
    dropped_one = honest(unacked=0, delivered=11, acked=10)
    verdicts, memory = run(dropped_one, at=1000.0)
    assert verdicts == []
    verdicts, memory = run(dropped_one, at=1010.0, memory=memory)
    assert verdicts == []  # quiet for 10 s: the gauge may not have caught up yet
    verdicts, _ = run(dropped_one, at=1016.0, memory=memory)
    assert [r.split(" [")[0] for r in verdicts[0].reasons] == [
        "settled 1 deliveries without acking them (11 delivered, 10 acked, 0 unacked)"]
    # A busy honest channel whose gauge lags by one delivery never stands still that long.
    _, memory = run(dropped_one, at=1000.0)
    verdicts, _ = run(honest(unacked=0, delivered=12, acked=11), at=1016.0, memory=memory)
    assert verdicts == []


def test_holding_a_delivery_longer_than_the_lease_without_a_lease_of_its_own() -> None:
    held = honest(unacked=1, delivered=11, acked=10)
    _, memory = run(held, at=1000.0)
    verdicts, memory = run(held, at=1000.0 + LEASE - 1, memory=memory)
    assert verdicts == []
    verdicts, _ = run(held, at=1000.0 + LEASE + 1, memory=memory)
    assert verdicts[0].reasons[0].startswith("held 1 deliveries unacked for 151s")
    # The look-ahead of an honest worker generating a long job: its lease is live, so it may wait.
    generating = {"w-alice": WorkerView(1, "alice", 10, "w-alice", queues=2, lease_until=1000.0 + 2 * LEASE)}
    verdicts, _ = run(held, at=1000.0 + LEASE + 1, memory=memory, workers=generating)
    assert verdicts == []
    # Acking anything restarts the clock.
    _, memory = run(held, at=1000.0)
    _, memory = run(honest(unacked=1, delivered=12, acked=11), at=1100.0, memory=memory)
    verdicts, _ = run(honest(unacked=1, delivered=12, acked=11), at=1000.0 + LEASE + 1, memory=memory)
    assert verdicts == []


def test_trusted_and_unknown_users_are_never_judged() -> None:
    hoarder = dict(unacked=50, delivered=50, acked=0, consumers=(ConsumerView(MODEL_QUEUE, prefetch=0,
                                                                            exclusive=True),))
    assert reasons(honest(user="guest", **hoarder)) == []  # type: ignore[arg-type]
    assert reasons(honest(user="w-stranger", **hoarder)) == []  # type: ignore[arg-type]
    verdicts, _ = run(honest(**hoarder))  # type: ignore[arg-type]
    assert verdicts[0].worker == ALICE
    assert verdicts[0].evidence["channels"][0]["unacked"] == 50


def test_channels_that_closed_are_forgotten() -> None:
    _, memory = run(honest())
    assert set(memory) == {"c1 (1)"}
    _, memory = run(honest(name="c9 (1)"), memory=memory)
    assert set(memory) == {"c9 (1)"}


def test_the_management_api_listings_become_views() -> None:
    channels = [{
        "name": "127.0.0.1:1 -> 127.0.0.1:5672 (2)", "user": "w-alice", "prefetch_count": 1,
        "messages_unacknowledged": 1, "connection_details": {"name": "127.0.0.1:1 -> 127.0.0.1:5672"},
        "message_stats": {"ack": 1, "deliver": 4, "deliver_get": 5, "get": 1, "get_no_ack": 0, "redeliver": 1},
    }, {"name": "other (1)", "user": "guest"}]
    consumers = [{"ack_required": True, "exclusive": False, "prefetch_count": 0, "queue": {"name": MODEL_QUEUE},
                  "channel_details": {"name": "127.0.0.1:1 -> 127.0.0.1:5672 (2)", "user": "w-alice"}}]
    first, other = channel_views(channels, consumers)
    assert first == ChannelView(name="127.0.0.1:1 -> 127.0.0.1:5672 (2)", connection="127.0.0.1:1 -> 127.0.0.1:5672",
                                user="w-alice", prefetch=1, unacked=1, delivered=5, acked=1, gets_no_ack=0,
                                consumers=(ConsumerView(MODEL_QUEUE, exclusive=False, prefetch=0),))
    assert other == ChannelView(name="other (1)", connection="", user="guest", prefetch=0)
