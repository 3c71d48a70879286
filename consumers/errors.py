"""Errors of the worker; the worker maps them to ack, nack, reject or a JobFaulted event."""


class ConsumerError(Exception):
    """Root of every worker error."""


class ModelLoadError(ConsumerError):
    """A model folder is missing, incomplete, or cannot be loaded on the chosen device."""


class GenerationError(ConsumerError):
    """A job cannot be generated as asked (the worker reports it as faulted)."""


class ClaimFailed(ConsumerError):
    """No answer from the claims service: it timed out, or the request could not be sent."""


class OfferWithdrawn(ConsumerError):
    """The dispatcher answered an ask with "not now" (the worker is paused, in maintenance or
    holds its cap of leases): ask again after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class WorkerStartError(ConsumerError):
    """The worker cannot start serving (e.g. a model's queue does not exist on the broker)."""
