"""Per-client HMAC-SHA256 signatures of message headers (optional per federation; see aggregator.security)."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_KEY = "x-flexlora-signature"


def sign(key: bytes, header_json: str) -> str:
    """The signature of the exact header JSON sent, which carries the payload's size and sha256."""
    return hmac.new(key, header_json.encode(), hashlib.sha256).hexdigest()
