"""Tensor payloads: safetensors bytes with a size and sha256 check; never pickle."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from schemas.errors import PayloadIntegrityError
from schemas.messages import PayloadInfo
from schemas.safetensors_stream import dtype_runs, encode_pieces, split_payload, tensors_from

_FINITE_BATCH = 4 * 1024 * 1024  # elements per finiteness check
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, PayloadInfo]:
    """Serialise tensors to safetensors bytes and describe them for the message header. The bytes are the
    library's own (`safetensors.torch.save`; a test checks), written without first copying every tensor."""
    _, pieces = encode_pieces(tensors)
    data = b"".join(pieces)
    return data, PayloadInfo(size=len(data), sha256=sha256_hex(data))


def verify_payload(data: bytes | bytearray, info: PayloadInfo) -> None:
    """Raise PayloadIntegrityError unless `data` has exactly the declared size and sha256."""
    if len(data) != info.size:
        raise PayloadIntegrityError(f"payload is {len(data)} bytes, header declares {info.size}")
    digest = sha256_hex(data)
    if digest != info.sha256:
        raise PayloadIntegrityError(f"payload sha256 {digest[:12]}… differs from the declared {info.sha256[:12]}…")


@dataclass(frozen=True)
class Decoded:
    tensors: dict[str, torch.Tensor]
    finite: bool  # no tensor holds NaN or ±inf


def decode_payload(data: bytes | bytearray, info: PayloadInfo | None = None) -> Decoded:
    """Check integrity (if `info` is given), parse safetensors bytes into float tensors, and check every value is
    finite, from one parse: the tensors are views into one buffer (a `bytes` payload is copied into one first, so
    they are writable and own nothing else), and finiteness is one pass over each run of one dtype in that
    buffer, not a call per tensor, which was most of the cost for the hundreds of small factors of an update.
    numpy, not torch: a torch op this size fans out to OpenMP threads whose spin-waiting starves the other
    aggregator processes on a small machine (measured: 3 aggregators ingested less than 1)."""
    if info is not None:
        verify_payload(data, info)
    body, entries = split_payload(data if isinstance(data, bytearray) else bytearray(data))
    finite = all(_finite(body[run[0].begin : run[-1].end], dtype) for dtype, run in dtype_runs(entries))
    return Decoded(tensors_from(entries, body), finite)


def decode_tensors(data: bytes | bytearray, info: PayloadInfo | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors payload (see decode_payload)."""
    return decode_payload(data, info).tensors


def _finite(raw: memoryview, dtype: torch.dtype) -> bool:
    """No NaN or ±inf among the values of `dtype` in `raw`, checked in batches so that a payload of hundreds of MB
    needs no temporary of its size. bfloat16, which numpy lacks, by its bits: an all-ones exponent is inf or NaN."""
    step = _FINITE_BATCH * dtype.itemsize
    for start in range(0, len(raw), step):
        piece = raw[start : start + step]
        if dtype == torch.bfloat16:
            if bool((np.frombuffer(piece, dtype=np.uint16) & 0x7F80 == 0x7F80).any()):
                return False
        elif not bool(np.isfinite(np.frombuffer(piece, dtype=_NUMPY[dtype])).all()):
            return False
    return True
