"""The exception tree for wire data: every refusal of a message carries a short machine-readable reason."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Every reason a message is refused for: the dead-letter reason header, the `flexlora_refused_total` label,
    and the rows of the README's refusal table (a test keeps the two in step)."""

    HEADER_SIZE = "header-size"
    SCHEMA = "schema"
    FEDERATION = "federation"
    IDENTITY = "identity"
    SIGNATURE = "signature"
    TOO_LARGE = "too-large"
    RANK = "rank"
    CHUNK = "chunk"
    INTEGRITY = "integrity"
    TRANSFERS = "transfers"
    SAFETENSORS = "safetensors"
    LAYOUT = "layout"
    NORM = "norm"
    NORM_OUTLIER = "norm-outlier"
    BASE_MODEL = "base-model"
    MODULES = "modules"
    REPLAY = "replay"
    STALE = "stale"
    VERSION = "version"
    NO_MAILBOX = "no-mailbox"
    INTERNAL = "internal"
    AGGREGATION = "aggregation"
    INCOMPLETE = "incomplete"  # a chunked update that stopped arriving: reported, not dead-lettered
    # Refused by a client (an adapter it cannot load), never by an aggregator.
    MISROUTED = "misrouted"
    ADAPTER_MISMATCH = "adapter-mismatch"
    INVALID = "invalid"  # the catch-all of SchemaError; every refusal names a sharper one


class SchemaError(ValueError):
    """A message or payload that cannot be accepted; `reason` is the dead-letter reason header."""

    reason: Reason = Reason.INVALID

    def __init__(self, detail: str, *, reason: Reason | None = None) -> None:
        super().__init__(detail)
        if reason is not None:
            self.reason = Reason(reason)
        self.detail = detail


class HeaderError(SchemaError):
    """The message header is missing, not JSON, or fails its pydantic model."""

    reason = Reason.SCHEMA


class PayloadIntegrityError(SchemaError):
    """The payload's size or sha256 differs from what the header declares."""

    reason = Reason.INTEGRITY


class TensorDecodeError(SchemaError):
    """The payload is not a well-formed safetensors file of the allowed dtypes."""

    reason = Reason.SAFETENSORS


class LoraLayoutError(SchemaError):
    """The tensors do not form the LoRA factors the header declares (keys, ranks, shapes, values)."""

    reason = Reason.LAYOUT
