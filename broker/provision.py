"""Least-privilege RabbitMQ users for edge clients, made through the broker's management HTTP API.

Each client gets a user of its own that may write only to its federation's updates exchange, read only
its own adapter mailbox, and configure nothing. Because such a client cannot declare anything, the
provisioner declares the federation's core topology and every client's mailbox itself, with the
administrator's AMQP connection, so the mailbox carries exactly the arguments `Topology.client` gives.

Passwords come from `secrets`; only a salted SHA-256 hash of each (RabbitMQ's own scheme) is sent to the
management API, and no password is ever logged or kept in a repr.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import requests

from broker.errors import BrokerError
from broker.topology import Topology
from broker.transport import Transport

log = logging.getLogger(__name__)

PASSWORD_BYTES = 32


class ProvisionError(BrokerError):
    """The management API refused or could not be reached, or a request would overwrite what it should not."""


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ's three permission regexes of one user in one vhost."""

    configure: str
    write: str
    read: str


def client_username(topology: Topology, client_id: str) -> str:
    """The RabbitMQ user of one client: the name RabbitMQ stamps as `user_id` on everything it publishes
    (the aggregators' identity check expects the same name: `Topology.client_user`)."""
    return topology.client_user(client_id)


def client_permissions(topology: Topology, client_id: str) -> Permissions:
    """Publish updates (and join requests) to the updates exchange; consume its own mailbox; nothing else."""
    return Permissions(
        configure="^$",
        write=f"^{re.escape(topology.updates_exchange)}$",
        read=f"^{re.escape(topology.adapter_queue(client_id))}$",
    )


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt ‖ sha256(salt ‖ password)), 4-byte salt."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class Outcome(enum.Enum):
    CREATED = "created"
    ROTATED = "rotated"  # a new password; connections already open keep working until they close
    KEPT = "kept"  # the user existed and keeps its password (unknown here); permissions re-applied


@dataclass(frozen=True)
class ClientAccess:
    """What provisioning did for one client; `password` is None when the existing one was kept."""

    client_id: str
    username: str
    outcome: Outcome
    password: str | None = field(default=None, repr=False)

    def broker_url(self, template: str) -> str:
        """`template` (an amqp:// URL without credentials: host, port, vhost) with this client's credentials."""
        if self.password is None:
            raise ProvisionError(f"the password of {self.username} was kept and is not known here")
        return with_credentials(template, self.username, self.password)


def with_credentials(url: str, username: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def vhost_of(amqp_url: str) -> str:
    return str(pika.URLParameters(amqp_url).virtual_host)


class ManagementAPI:
    """The few calls of RabbitMQ's management HTTP API that provisioning needs (users and permissions)."""

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = without_credentials(base_url).rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.auth = (username, password)

    @classmethod
    def from_urls(cls, management_url: str | None, broker_url: str, **options: Any) -> ManagementAPI:
        """Credentials from the management URL when it has them, else the administrator's broker URL's; the
        address defaults to the broker's host on the management plugin's port (15672, 15671 for amqps)."""
        broker = urlsplit(broker_url)
        if management_url is None:
            scheme, port = ("https", 15671) if broker.scheme == "amqps" else ("http", 15672)
            management_url = f"{scheme}://{broker.hostname or '127.0.0.1'}:{port}"
        given = urlsplit(management_url)
        source = given if given.username else broker
        return cls(management_url, unquote(source.username or "guest"), unquote(source.password or "guest"), **options)

    def _request(self, method: str, *path: str, body: dict[str, Any] | None = None) -> requests.Response:
        """`path` is the URL's parts after /api/, each escaped here (the vhost "/" is one part: %2F)."""
        url = self.base_url + "/api/" + "/".join(quote(part, safe="") for part in path)
        try:
            response = self.session.request(method, url, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ProvisionError(f"management API at {self.base_url} unreachable: {type(exc).__name__}") from exc
        if response.status_code == 401:
            raise ProvisionError(f"the management API at {self.base_url} refused the administrator's credentials")
        return response

    def _checked(self, method: str, *path: str, body: dict[str, Any] | None = None) -> requests.Response:
        response = self._request(method, *path, body=body)
        if not response.ok:
            raise _failed(method, path, response)
        return response

    def check(self, vhost: str) -> None:
        """The administrator may manage users, and the vhost exists."""
        who = self._checked("GET", "whoami").json()
        tags = who.get("tags", [])
        tags = tags.split(",") if isinstance(tags, str) else tags
        if "administrator" not in tags:
            raise ProvisionError(f"user {who.get('name')!r} is not a RabbitMQ administrator; it cannot create users")
        if self._request("GET", "vhosts", vhost).status_code == 404:
            raise ProvisionError(f"vhost {vhost!r} does not exist")

    def user(self, name: str) -> dict[str, Any] | None:
        response = self._request("GET", "users", name)
        if response.status_code == 404:
            return None
        if not response.ok:
            raise _failed("GET", ("users", name), response)
        data: dict[str, Any] = response.json()
        return data

    def put_user(self, name: str, password: str) -> None:
        """Create or update a user with no tags (no management access) and this password."""
        body = {
            "password_hash": rabbit_password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": "",
        }
        self._checked("PUT", "users", name, body=body)

    def delete_user(self, name: str) -> bool:
        response = self._request("DELETE", "users", name)
        if response.status_code not in (204, 404):
            raise _failed("DELETE", ("users", name), response)
        return response.status_code == 204

    def set_permissions(self, vhost: str, user: str, permissions: Permissions) -> None:
        body = {"configure": permissions.configure, "write": permissions.write, "read": permissions.read}
        self._checked("PUT", "permissions", vhost, user, body=body)

    def permissions(self, vhost: str, user: str) -> Permissions | None:
        response = self._request("GET", "permissions", vhost, user)
        if response.status_code == 404:
            return None
        if not response.ok:
            raise _failed("GET", ("permissions", vhost, user), response)
        data = response.json()
        return Permissions(str(data["configure"]), str(data["write"]), str(data["read"]))


def _failed(method: str, path: tuple[str, ...], response: requests.Response) -> ProvisionError:
    # The path names users and vhosts, never a password; the bodies we send are not echoed back.
    return ProvisionError(f"{method} /api/{'/'.join(path)}: {response.status_code} {response.text[:300]}")


def _tags(user: dict[str, Any]) -> list[str]:
    tags = user.get("tags", [])
    return [t for t in (tags.split(",") if isinstance(tags, str) else tags) if t]


def provision_clients(
    api: ManagementAPI,
    admin: Transport,
    topology: Topology,
    client_ids: Sequence[str],
    *,
    vhost: str,
    rotate: bool = False,
) -> list[ClientAccess]:
    """Declare the federation's topology and each client's mailbox, then make (or keep, or rotate) each
    client's user and set its permissions. Safe to run again: mailboxes and permissions are re-applied,
    existing users keep their passwords unless `rotate`."""
    if len(set(client_ids)) != len(client_ids):
        raise ProvisionError("a client id is listed twice")
    api.check(vhost)
    # Mailboxes first, so a client that connects as soon as its user exists finds its queue.
    admin.declare(topology.core())
    for client_id in client_ids:
        admin.declare(topology.client(client_id))
    done = []
    for client_id in client_ids:
        name = client_username(topology, client_id)
        existing = api.user(name)
        if existing is not None and _tags(existing):
            raise ProvisionError(f"user {name!r} exists with tags {_tags(existing)}; refusing to demote it")
        password: str | None = None
        if existing is None or rotate:
            password = secrets.token_urlsafe(PASSWORD_BYTES)
            api.put_user(name, password)
            outcome = Outcome.CREATED if existing is None else Outcome.ROTATED
        else:
            outcome = Outcome.KEPT
        api.set_permissions(vhost, name, client_permissions(topology, client_id))
        log.info("%s user %s for client %s of federation %s", outcome.value, name, client_id, topology.federation)
        done.append(ClientAccess(client_id, name, outcome, password))
    return done
