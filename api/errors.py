"""API errors: each carries its HTTP status and an AI Horde style return code (``rc``).

Every error the API answers is JSON ``{"message": str, "rc": "CamelCase"}``; the handlers in
``api.app`` turn these (and framework errors) into responses.
"""

from __future__ import annotations


class HordeError(Exception):
    status: int = 400
    rc: str = "BadRequest"

    def __init__(self, message: str, *, rc: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if rc is not None:
            self.rc = rc
        if status is not None:
            self.status = status


class BadRequest(HordeError):
    status, rc = 400, "BadRequest"


class UnknownModel(HordeError):
    status, rc = 400, "UnknownModel"


class InvalidAPIKey(HordeError):
    status, rc = 401, "InvalidAPIKey"


class RequestNotFound(HordeError):
    status, rc = 404, "RequestNotFound"


class ServiceUnavailable(HordeError):
    status, rc = 503, "ServiceUnavailable"


class Forbidden(HordeError):
    status, rc = 403, "Forbidden"


class AnonForbidden(HordeError):
    status, rc = 403, "AnonForbidden"


class WrongCredentials(HordeError):
    status, rc = 403, "WrongCredentials"


class UserNotFound(HordeError):
    status, rc = 404, "UserNotFound"


class WorkerNotFound(HordeError):
    status, rc = 404, "WorkerNotFound"


class InvalidJobID(HordeError):
    status, rc = 404, "InvalidJobID"


class KudosValidationError(HordeError):
    """A refused kudos transfer; ``rc`` says why (AI Horde's codes: KudosTransferToSelf, ...)."""

    status, rc = 400, "KudosValidationError"


class DuplicateGen(HordeError):
    status, rc = 400, "DuplicateGen"


class AbortedGen(HordeError):
    status, rc = 400, "AbortedGen"


# --- requesters (issue 6): abuse limits ------------------------------------------------------------


class CorruptPrompt(HordeError):
    status, rc = 400, "CorruptPrompt"


class TimeoutIP(HordeError):
    """The client's IP is timed out (repeated corrupt prompts); ``Retry-After`` says for how long."""

    status, rc = 403, "TimeoutIP"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(-(-retry_after // 1))))}


class TooManyRequests(HordeError):
    """A rate limit; ``Retry-After`` (seconds) says when the next request would be accepted."""

    status, rc = 429, "TooManyRequests"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(-(-retry_after // 1))))}  # whole seconds, rounded up


class TooManyPrompts(HordeError):
    """AI Horde's code for a requester over its cap of concurrent jobs."""

    status, rc = 429, "TooManyPrompts"
