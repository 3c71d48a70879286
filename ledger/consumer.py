"""The ledger consumer: settles kudos from trusted events (``job.done``, ``kudos.uptime``) on ``horde.ledger``.

Effectively once. For a batch of deliveries, one transaction records each ``message_id`` (each
job's ``job-done:<job_id>`` for a group) in ``ledger_inbox`` (ON CONFLICT DO NOTHING), posts the
settlements of the new ones, and commits; only then are the deliveries acked. A crash between
commit and ack redelivers them, and their inbox rows make them no-ops (as would the job's entry
keys, see ``ledger.book``).

What happens to a delivery:

- not a ``job-done.v1`` (or a group of them, ``jobs-done.v1``) or an ``uptime-earned.v1``, not
  published by a trusted AMQP user (the broker validates ``user_id``), no ``message_id``, a body
  that does not parse, or a settlement the ledger refuses
  → ``basic_reject(requeue=False)``: dead-lettered to ``horde.dead``, logged with the reason;
- a group some of whose events the ledger refuses → the others settled, then the message
  dead-lettered (``PartlyRefused``);
- a database failure → rollback, ``basic_nack(requeue=True)``, back off, carry on;
- otherwise settled (or found already settled) and acked.

A batch is whatever arrives within ``LINGER_SECONDS`` (50 ms) of its first delivery, at most half
of ``prefetch`` deliveries or settlements: a commit is spread over the messages of 50 ms (each
costs little next to the commit: ``bench/ledger.py`` settles 5,000/s in batches of hundreds, and at
~150 jobs/s batches of ~3 cost 1.4 ms of the ledger's CPU a job, docs/benchmarks.md), and no
settlement waits longer than that for company (the wait counts from its arrival, so deliveries that
came while the last batch committed wait only what is left of it). A batch's transaction runs in a
database thread while this thread reads the next batch from the broker (the other half of
``prefetch``); the acks still follow the commit, so the guarantee above is unchanged.
"""

from __future__ import annotations

import itertools
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import Connection, Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from broker.amqp import connect_sync, declare_sync
from broker.errors import BadMessage, BrokerError
from broker.messages import JobDone, JobsDone, UptimeEarned, decode
from broker.topology import LEDGER_QUEUE, build_topology
from config import Settings, load_model_reference
from config.database import make_sync_engine, utcnow
from ledger.book import Posting, column_length, insert_ignoring_duplicates, job_posting, post_many, uptime_posting
from ledger.errors import LedgerError, PartlyRefused, RefusedMessage
from ledger.tables import inbox

log = logging.getLogger(__name__)

DEFAULT_PREFETCH = 100
_DRAIN_READ_SECONDS = 0.002  # one read while a batch commits in the database thread
#: How long a batch's first delivery waits for others to share its commit.
LINGER_SECONDS = 0.05
_MESSAGE_ID_LEN = column_length(inbox.c.message_id)
#: Database errors that retrying cannot fix: the message is dead-lettered instead.
_PERMANENT = (LedgerError, DataError, IntegrityError)


@dataclass(frozen=True)
class Delivery:
    """What the ledger reads of an AMQP delivery."""

    tag: int
    message_id: str | None
    user_id: str | None
    type: str | None
    body: bytes

    @classmethod
    def from_pika(cls, method: Any, properties: pika.BasicProperties, body: bytes) -> Delivery:
        return cls(method.delivery_tag, properties.message_id, properties.user_id, properties.type, body)


@dataclass(frozen=True)
class Settlement:
    """One event of a delivery that passed screening, its inbox key, and the posting it asks for
    (None if nothing moves). A grouped delivery gives several, with the same ``tag``."""

    tag: int
    message_id: str
    posting: Posting | None


#: Deliveries settled in part (``PartlyRefused``): delivery tag -> (message_id, why).
_Refused = dict[int, tuple[str | None, str]]


@dataclass(frozen=True)
class BatchResult:
    settled: int  # postings applied now
    duplicates: int  # messages seen before (inbox), or jobs already settled


#: The trusted events the ledger settles, and the posting each asks for.
_POSTINGS: dict[str, tuple[type[JobDone] | type[UptimeEarned], Callable[[Any], Posting | None]]] = {
    JobDone.schema_name: (JobDone, job_posting),
    UptimeEarned.schema_name: (UptimeEarned, uptime_posting),
}
_SETTLED_TYPES = sorted([*_POSTINGS, JobsDone.schema_name])


def screen(delivery: Delivery, trusted_users: Collection[str]) -> list[Settlement]:
    """Check a delivery without I/O; its settlements (several for a ``jobs-done.v1``, each keyed
    ``job-done:<job_id>`` in the inbox, as the job's own event would be). ``RefusedMessage`` says
    why it must be dead-lettered; ``PartlyRefused``, for a group, carries the settlements of the
    events that may still be settled (its events come from one trusted service's rows, so a
    refusal is a bug: the refused jobs stay unsettled, counted by ``/metrics`` as
    ``horde_settlement_pending_jobs``, and the dead letter says why)."""
    if delivery.type not in _SETTLED_TYPES:
        raise RefusedMessage(f"message type {delivery.type!r} is not one of {_SETTLED_TYPES}")
    if delivery.user_id is None:
        raise RefusedMessage(f"no user_id: only trusted services may publish {delivery.type}")
    if delivery.user_id not in trusted_users:
        raise RefusedMessage(f"AMQP user {delivery.user_id!r} is not trusted to publish {delivery.type}")
    if not delivery.message_id or len(delivery.message_id) > _MESSAGE_ID_LEN:
        raise RefusedMessage(f"message_id must be 1..{_MESSAGE_ID_LEN} characters")
    try:
        if delivery.type == JobsDone.schema_name:
            return _screen_group(delivery.tag, decode(JobsDone, delivery.body, delivery.type))
        schema, posting_for = _POSTINGS[delivery.type]
        event = decode(schema, delivery.body, delivery.type)
        return [Settlement(delivery.tag, delivery.message_id, posting_for(event))]
    except RefusedMessage:
        raise
    except (BadMessage, LedgerError) as exc:
        raise RefusedMessage(str(exc)) from exc


def _screen_group(tag: int, group: JobsDone) -> list[Settlement]:
    """A group's settlements; ``PartlyRefused`` (with the others) if some of its events cannot be
    settled, ``RefusedMessage`` if none can."""
    settlements: list[Settlement] = []
    refusals: list[str] = []
    for done in group.events:
        try:
            settlements.append(Settlement(tag, f"job-done:{done.job_id}", job_posting(done)))
        except LedgerError as exc:
            refusals.append(f"job {done.job_id}: {exc}")
    if refusals:
        reason = f"{len(refusals)} of {len(group.events)} events refused; " + "; ".join(refusals[:3])
        if not settlements:
            raise RefusedMessage(reason)
        raise PartlyRefused(reason, settlements)
    return settlements


def apply_batch(conn: Connection, settlements: Sequence[Settlement], *, now: datetime) -> BatchResult:
    """Record the messages in the inbox and settle those not seen before; the caller commits."""
    ids = sorted({s.message_id for s in settlements})
    new_ids = insert_ignoring_duplicates(
        conn, inbox, [{"message_id": m, "received_at": now} for m in ids], "message_id"
    )
    postings: list[Posting] = []
    for s in settlements:
        if s.message_id in new_ids:
            new_ids.discard(s.message_id)  # a message_id repeated within the batch counts once
            if s.posting is not None:
                postings.append(s.posting)
    settled = sum(post_many(conn, postings, now=now))
    return BatchResult(settled=settled, duplicates=len(settlements) - settled)


class _Backoff:
    """Growing waits after failures: ``first``, doubling up to ``cap``; ``reset()`` after a success."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self._first, self._cap, self._next = first, cap, first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self._cap)
        return delay

    def reset(self) -> None:
        self._next = self._first


class LedgerConsumer:
    """Consumes ``horde.ledger`` until ``stop()``; reconnects if RabbitMQ goes away."""

    def __init__(self, settings: Settings, engine: Engine, *, prefetch: int = DEFAULT_PREFETCH) -> None:
        self._url = settings.rabbitmq_url
        self._trusted = frozenset(settings.trusted_amqp_users)
        self._topology = build_topology(load_model_reference(settings.model_reference).names())
        self._engine = engine
        self._prefetch = prefetch
        # Half the unacked window per batch: the other half arrives while the batch commits.
        self._batch_max = max(1, prefetch // 2)
        self._database: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._pending: list[Delivery] = []
        self._first_pending_at = 0.0  # monotonic; when the oldest of ``_pending`` arrived
        self._db_backoff = _Backoff()
        #: Set while consuming (tests and health checks wait on it).
        self.ready = threading.Event()

    def stop(self) -> None:
        """Ask the consumer to finish its batch and close; safe from any thread or signal handler."""
        self._stopping.set()

    def serve(self) -> None:
        """Consume until ``stop()``. Raises ``BrokerError`` if RabbitMQ fails before the first ready."""
        backoff = _Backoff(first=0.5, cap=30.0)
        ever_ready = False
        while not self._stopping.is_set():
            try:
                self._consume()
            except (BrokerError, pika.exceptions.AMQPError) as exc:
                ever_ready = ever_ready or self.ready.is_set()
                if not ever_ready:
                    if isinstance(exc, BrokerError):
                        raise
                    raise BrokerError(f"RabbitMQ refused the ledger consumer: {exc!r}") from exc
                if self.ready.is_set():
                    backoff.reset()  # it was consuming: the first retry comes quickly
                delay = backoff.next()
                log.warning("lost RabbitMQ (%r); reconnecting in %.0f s", exc, delay)
                self._stopping.wait(delay)
            finally:
                self.ready.clear()

    def _consume(self) -> None:
        with _quiet("pika"):  # a failed connect is reported once, by us, not as pika's tracebacks
            connection = connect_sync(self._url, name="horde-ledger")
        try:
            channel = connection.channel()
            declare_sync(channel, self._topology)
            channel.basic_qos(prefetch_count=self._prefetch)
            channel.basic_consume(LEDGER_QUEUE, self._on_message)
            log.info("ledger consumer ready")
            self.ready.set()
            self._database = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-db")
            while not self._stopping.is_set():
                # Deliveries read while the last batch committed are settled without waiting.
                connection.process_data_events(time_limit=0 if self._pending else 0.25)
                if self._pending:
                    self._drain(connection)
                    self._flush(connection, channel)
            if self._pending:
                self._flush(connection, channel)
        finally:
            if self._database is not None:
                self._database.shutdown(wait=True)  # a commit in flight finishes; unacked, it is redelivered
                self._database = None
            self._pending.clear()  # their delivery tags die with the channel; the broker requeues them
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _drain(self, connection: pika.BlockingConnection) -> None:
        """Keep reading until a batch is full or its first delivery has waited ``LINGER_SECONDS``."""
        while len(self._pending) < self._batch_max and not self._stopping.is_set():
            left = self._first_pending_at + LINGER_SECONDS - time.monotonic()
            if left <= 0:
                return
            connection.process_data_events(time_limit=left)

    def _on_message(self, _channel: BlockingChannel, method: Any, properties: pika.BasicProperties,
                    body: bytes) -> None:
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(Delivery.from_pika(method, properties, body))

    def _flush(self, connection: pika.BlockingConnection, channel: BlockingChannel) -> None:
        settlements: list[Settlement] = []
        refused: _Refused = {}  # groups settled in part, dead-lettered once the rest is committed
        taken = 0  # a batch is at most ``_batch_max`` settlements (one group may pass it), in delivery order
        for delivery in self._pending:
            if len(settlements) >= self._batch_max:
                break
            taken += 1
            try:
                settlements.extend(screen(delivery, self._trusted))
            except PartlyRefused as exc:
                settlements.extend(exc.settlements)
                refused[delivery.tag] = (delivery.message_id, str(exc))
            except RefusedMessage as exc:
                self._dead_letter(channel, delivery.tag, delivery.message_id, str(exc))
        del self._pending[:taken]
        self._first_pending_at = time.monotonic()  # the rest (if any) starts the next batch's wait
        if settlements and not self._settle(channel, settlements, connection, refused):
            self._sleep(connection, self._db_backoff.next())

    def _settle(self, channel: BlockingChannel, settlements: Sequence[Settlement],
                connection: pika.BlockingConnection | None = None, refused: _Refused | None = None) -> bool:
        """Commit then ack ``settlements``; False after a database failure (they are requeued)."""
        refused = refused or {}
        last = settlements[-1].tag
        several = settlements[0].tag != last  # more than one delivery
        try:
            result = self._commit(settlements, connection)
        except _PERMANENT as exc:
            if several:
                log.info("batch of %d refused (%s); settling delivery by delivery", len(settlements), exc)
                return self._settle_each(channel, settlements, refused)
            events = settlements[0].message_id + (f" and {len(settlements) - 1} more" if len(settlements) > 1 else "")
            self._dead_letter(channel, last, events, f"the ledger refused it: {exc}")
            return True
        except SQLAlchemyError as exc:
            log.error("database error, requeueing %d settlement(s): %s", len(settlements), _one_line(exc))
            channel.basic_nack(last, multiple=several, requeue=True)
            return False
        self._release(channel, sorted({s.tag for s in settlements}), refused)
        self._db_backoff.reset()
        log.debug("settled %d, duplicates %d", result.settled, result.duplicates)
        return True

    def _release(self, channel: BlockingChannel, tags: Sequence[int], refused: _Refused) -> None:
        """After the commit: dead-letter the deliveries settled in part, then ack the others (one
        multiple ack: the rejected ones are no longer outstanding)."""
        for tag in tags:
            if tag in refused:
                message_id, reason = refused[tag]
                self._dead_letter(channel, tag, message_id, f"{reason} (the other events are settled)")
        settled = [tag for tag in tags if tag not in refused]
        if settled:
            self._ack(channel, settled[-1], multiple=len(tags) > 1)

    def _commit(self, settlements: Sequence[Settlement], connection: pika.BlockingConnection | None) -> BatchResult:
        """One transaction for the batch. With ``connection``, it runs in the database thread while
        this one keeps reading deliveries into the next batch (pika is used from this thread only)."""

        def transaction() -> BatchResult:
            with self._engine.begin() as conn:
                return apply_batch(conn, settlements, now=utcnow())

        if connection is None or self._database is None:
            return transaction()
        done = self._database.submit(transaction)
        while not done.done():
            connection.process_data_events(time_limit=_DRAIN_READ_SECONDS)
        return done.result()

    def _settle_each(self, channel: BlockingChannel, settlements: Sequence[Settlement], refused: _Refused) -> bool:
        """One transaction per delivery (a group's settlements stay together)."""
        deliveries = [list(group) for _, group in itertools.groupby(settlements, key=lambda s: s.tag)]
        for i, delivery in enumerate(deliveries):
            if not self._settle(channel, delivery, refused=refused):
                if i + 1 < len(deliveries):
                    channel.basic_nack(settlements[-1].tag, multiple=True, requeue=True)
                return False
        return True

    def _ack(self, channel: BlockingChannel, tag: int, *, multiple: bool) -> None:
        channel.basic_ack(tag, multiple=multiple)

    def _dead_letter(self, channel: BlockingChannel, tag: int, message_id: str | None, reason: str) -> None:
        log.warning("dead-lettered message %s: %s", message_id, reason)
        channel.basic_reject(tag, requeue=False)

    def _sleep(self, connection: pika.BlockingConnection, seconds: float) -> None:
        """Wait while keeping the connection alive (deliveries arriving meanwhile are buffered)."""
        waited = 0.0
        while waited < seconds and not self._stopping.is_set():
            connection.sleep(0.1)
            waited += 0.1


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def check_database(engine: Engine) -> str | None:
    """None if the ledger's tables can be read; otherwise a one-line description of the problem."""
    try:
        with engine.connect() as conn:
            conn.execute(select(inbox.c.message_id).limit(1))
    except SQLAlchemyError as exc:
        where = make_url(str(engine.url)).render_as_string(hide_password=True)
        return f"cannot use the database at {where} ({_one_line(exc)}); is it up and migrated (`horde db upgrade`)?"
    return None


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda _signum, _frame: stop())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(settings: Settings) -> int:
    """Entry point of ``horde ledger``: consume until SIGTERM/SIGINT; 1 with a message if it cannot."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = make_sync_engine(settings.resolved_database_url, pool_pre_ping=True)
    try:
        problem = check_database(engine)
        if problem:
            print(f"horde ledger: {problem}", file=sys.stderr)
            return 1
        consumer = LedgerConsumer(settings, engine, prefetch=settings.ledger_prefetch)
        with _stop_on_signals(consumer.stop):
            consumer.serve()
    except BrokerError as exc:
        print(f"horde ledger: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    log.info("ledger consumer stopped")
    return 0
