"""The exception tree for wire data: every refusal of a message carries a short machine-readable reason."""


class SchemaError(ValueError):
    """A message or payload that cannot be accepted; `reason` is the dead-letter reason header."""

    reason = "invalid"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        if reason is not None:
            self.reason = reason
        self.detail = detail


class HeaderError(SchemaError):
    """The message header is missing, not JSON, or fails its pydantic model."""

    reason = "schema"


class PayloadIntegrityError(SchemaError):
    """The payload's size or sha256 differs from what the header declares."""

    reason = "integrity"


class TensorDecodeError(SchemaError):
    """The payload is not a well-formed safetensors file of the allowed dtypes."""

    reason = "safetensors"


class LoraLayoutError(SchemaError):
    """The tensors do not form the LoRA factors the header declares (keys, ranks, shapes, values)."""

    reason = "layout"
