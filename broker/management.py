"""A small async client for RabbitMQ's management HTTP API: worker users, their permissions and
limits, and the connection, channel and consumer listings the watchdog reads.

Facts this relies on were verified on RabbitMQ 3.10.8 (``../shared/reference/rabbitmq-permissions.md``):
201 on create and 204 on update; ``DELETE /api/users/<u>`` closes the user's connections and
requeues what they held; a topic permission restricts only when an entry exists for that exchange,
so whoever sets one should read it back.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from broker.errors import BrokerError


class ManagementError(BrokerError):
    """The management API refused a call or could not be reached."""


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names (``/`` when it names none)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _q(segment: str) -> str:
    return quote(segment, safe="")


class Management:
    """One management API endpoint, with its admin credentials taken from the URL
    (``http://user:password@host:15672/``)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
        self._http = httpx.AsyncClient(base_url=base, auth=auth, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None,
                    ok: tuple[int, ...] = (200, 201, 204)) -> httpx.Response:
        try:
            response = await self._http.request(method, path, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise ManagementError(f"RabbitMQ management API unreachable ({method} {path}): {exc}") from exc
        if response.status_code not in ok:
            raise ManagementError(f"RabbitMQ management API: {method} {path} -> {response.status_code} "
                                  f"{response.text[:200]}")
        return response

    # --- users, permissions, limits -------------------------------------------------------------

    async def put_user(self, user: str, password: str, *, tags: str = "") -> None:
        await self._call("PUT", f"/api/users/{_q(user)}", json={"password": password, "tags": tags})

    async def delete_user(self, user: str) -> bool:
        """Delete a user (closing its connections); False if there was none."""
        response = await self._call("DELETE", f"/api/users/{_q(user)}", ok=(204, 404))
        return response.status_code == 204

    async def user_exists(self, user: str) -> bool:
        response = await self._call("GET", f"/api/users/{_q(user)}", ok=(200, 404))
        return response.status_code == 200

    async def set_permissions(self, vhost: str, user: str, *, configure: str, write: str, read: str) -> None:
        await self._call("PUT", f"/api/permissions/{_q(vhost)}/{_q(user)}",
                         json={"configure": configure, "write": write, "read": read})

    async def permissions(self, vhost: str, user: str) -> dict[str, Any] | None:
        response = await self._call("GET", f"/api/permissions/{_q(vhost)}/{_q(user)}", ok=(200, 404))
        return response.json() if response.status_code == 200 else None

    async def set_topic_permissions(self, vhost: str, user: str, *, exchange: str, write: str, read: str) -> None:
        await self._call("PUT", f"/api/topic-permissions/{_q(vhost)}/{_q(user)}",
                         json={"exchange": exchange, "write": write, "read": read})

    async def topic_permissions(self, vhost: str, user: str) -> list[dict[str, Any]]:
        response = await self._call("GET", f"/api/topic-permissions/{_q(vhost)}/{_q(user)}", ok=(200, 404))
        return list(response.json()) if response.status_code == 200 else []

    async def set_user_limit(self, user: str, name: str, value: int) -> None:
        await self._call("PUT", f"/api/user-limits/{_q(user)}/{_q(name)}", json={"value": value})

    # --- connections, channels, consumers --------------------------------------------------------

    async def close_connections(self, user: str, *, reason: str = "closed by the horde") -> None:
        """Close every connection of ``user``; what they held unacked is requeued by the broker."""
        await self._call("DELETE", f"/api/connections/username/{_q(user)}", headers={"X-Reason": reason},
                         ok=(204, 404))

    async def connections(self, vhost: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", f"/api/vhosts/{_q(vhost)}/connections")).json())

    async def channels(self, vhost: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", f"/api/vhosts/{_q(vhost)}/channels")).json())

    async def consumers(self, vhost: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", f"/api/consumers/{_q(vhost)}")).json())

    async def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        response = await self._call("GET", f"/api/queues/{_q(vhost)}/{_q(name)}", ok=(200, 404))
        return response.json() if response.status_code == 200 else None

    # --- added for worker provisioning (issue 6) --------------------------------------------------

    async def put_user_hash(self, user: str, password_hash: str, *, tags: str = "") -> None:
        """Create or update a user from a salted hash (``rabbit_password_hashing_sha256``), so the
        password itself is never sent."""
        await self._call("PUT", f"/api/users/{_q(user)}", json={
            "password_hash": password_hash, "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": tags})

    async def user_limits(self, user: str) -> dict[str, int]:
        """The limits set on ``user`` (max-connections, max-channels), empty if none."""
        response = await self._call("GET", f"/api/user-limits/{_q(user)}", ok=(200, 404))
        found = response.json() if response.status_code == 200 else []
        return dict(found[0].get("value", {})) if found else {}

    async def user_connections(self, user: str) -> list[dict[str, Any]]:
        """The open connections of ``user``, in every vhost."""
        return [c for c in (await self._call("GET", "/api/connections")).json() if c.get("user") == user]
