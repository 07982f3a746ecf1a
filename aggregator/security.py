"""Who sent a message, and whether it is what they signed: checked before the payload is touched.

Identity comes from the AMQP `user_id` property, which RabbitMQ validates against the connection's
authenticated user (a message claiming another user is refused by the broker itself), never from the
message body: with `require_identity`, an update or join request must come from the user provisioned
for the client it names (`Topology.client_user`). Signatures are optional per federation: the client
signs the exact header JSON it sends, which carries the payload's size and sha256, with HMAC-SHA256
under its own key, so a valid signature covers the payload too once its hash is checked.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.topology import Topology
from broker.transport import Message
from schemas.errors import Reason, SchemaError
from schemas.messages import HEADER_KEY
from schemas.signing import SIGNATURE_KEY, sign


def load_signing_keys(path: Path) -> dict[str, bytes]:
    """A JSON object of client id -> hex key (what `flexlora provision --signing-keys` writes)."""
    try:
        raw = json.loads(path.read_text())
        return {str(client): bytes.fromhex(key) for client, key in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot read signing keys from {path}: {exc}") from exc


@dataclass(frozen=True)
class Guard:
    topology: Topology
    require_identity: bool = False
    signing_keys: Mapping[str, bytes] | None = None

    def check(self, message: Message, client_id: str) -> None:
        """Refuse ("identity", "signature") a message not sent, or not signed, by the client it names."""
        if self.require_identity:
            expected = self.topology.client_user(client_id)
            if message.user_id != expected:
                raise SchemaError(
                    f"message names client {client_id!r} but was published by broker user {message.user_id!r}",
                    reason=Reason.IDENTITY,
                )
        if self.signing_keys is None:
            return
        key = self.signing_keys.get(client_id)
        if key is None:
            raise SchemaError(f"client {client_id!r} has no signing key in this federation", reason=Reason.SIGNATURE)
        given = message.headers.get(SIGNATURE_KEY, "")
        if not hmac.compare_digest(given, sign(key, message.headers.get(HEADER_KEY, ""))):
            raise SchemaError(f"bad or missing signature for client {client_id!r}", reason=Reason.SIGNATURE)
