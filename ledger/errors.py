"""Errors of the ledger; the ledger consumer maps them to reject (dead-letter), the CLI to a message.

A ``LedgerError`` is permanent: retrying the same input gives the same error. Transient failures
(database unreachable, serialization failures) stay SQLAlchemy errors, so callers can tell them
apart and retry those.
"""

from typing import Any


class LedgerError(Exception):
    """Root of every ledger error."""


class InvalidPosting(LedgerError):
    """A posting that must not be written: legs not summing to zero, bad keys, out-of-range values."""


class PostingConflict(LedgerError):
    """Some, but not all, keys of a posting are already in the ledger: a key collision between
    two different movements. Nothing may be written; the caller rolls its transaction back."""


class UnsupportedDatabase(LedgerError):
    """The ledger runs on PostgreSQL and SQLite only."""


class RefusedMessage(LedgerError):
    """A message the ledger will not settle (untrusted, malformed, unknown type); dead-lettered."""


class PartlyRefused(RefusedMessage):
    """A group (``jobs-done.v1``) some of whose events the ledger will not settle: the others
    (``settlements``) are settled, then the message is dead-lettered with the reason."""

    def __init__(self, reason: str, settlements: list[Any]) -> None:  # ledger.consumer.Settlement
        super().__init__(reason)
        self.settlements = settlements
