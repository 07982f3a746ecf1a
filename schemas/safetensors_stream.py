"""The safetensors format written piece by piece and read without copying, for payloads of hundreds of MB.

The safetensors library saves to one `bytes` and loads from one `bytes` by copying every tensor, which
holds a payload in memory two or three times over. Chunked transfers need neither: the writer yields the
header and then each tensor's own memory, so a sender can hash and send it in chunks, and the reader makes
tensors that are views into the buffer the chunks were reassembled into. The layout is safetensors' own
(https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON header
padded with spaces to 8 bytes, then the tensors' bytes in the order the library writes them (larger dtypes
first, then by name), so `encode_pieces` gives the same bytes as `safetensors.torch.save` (a test checks
this) and the library reads what it writes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from schemas.errors import TensorDecodeError
from schemas.messages import PayloadInfo

# The dtypes a LoRA payload may hold, by safetensors' names.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ORDER = {name: k for k, name in enumerate(DTYPES)}  # the library writes F64, F32, BF16, F16, then by name
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the library's own limit


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same values; no copy when it is one already."""
    out = tensor.detach()
    if out.device.type != "cpu":
        out = out.cpu()
    return out.contiguous()


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (bfloat16 through an int16 view: numpy has no bfloat16)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().data.cast("B")


def encode_pieces(tensors: Mapping[str, torch.Tensor]) -> tuple[int, list[memoryview]]:
    """The payload's size and its pieces: the header, then each tensor's memory (not copied)."""
    plain = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise TensorDecodeError(f"tensor {name!r} has dtype {tensor.dtype}; only float dtypes are sent")
        plain[name] = _plain(tensor)
    order = sorted(plain, key=lambda n: (_ORDER[_NAMES[plain[n].dtype]], n))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = plain[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    pieces = [memoryview(struct.pack("<Q", len(text)) + text)]
    pieces += [_raw(plain[name]) for name in order if plain[name].numel() > 0]
    return 8 + len(text) + offset, pieces


def describe(pieces: list[memoryview], size: int) -> PayloadInfo:
    """Size and sha256 of a payload given as pieces, hashed in place."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return PayloadInfo(size=size, sha256=digest.hexdigest())


def iter_chunks(pieces: list[memoryview], chunk_bytes: int) -> Iterator[bytes]:
    """The payload cut into chunks of exactly `chunk_bytes` (the last may be shorter); one chunk in memory."""
    buffer = bytearray()
    for piece in pieces:
        start = 0
        while start < len(piece):
            take = min(chunk_bytes - len(buffer), len(piece) - start)
            buffer += piece[start : start + take]
            start += take
            if len(buffer) == chunk_bytes:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


@dataclass(frozen=True)
class Entry:
    """One tensor of a payload: where its bytes lie, counted from the start of the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def header_length(first: bytes | bytearray | memoryview, total: int) -> int:
    """The header's length from the payload's first 8 bytes, checked against the payload's size."""
    if len(first) < 8 or total < 8:
        raise TensorDecodeError("payload is not valid safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_BYTES or 8 + n > total:
        raise TensorDecodeError(f"payload is not valid safetensors: header of {n} bytes in a {total}-byte payload")
    return int(n)


def parse_header(text: bytes | bytearray | memoryview, data_bytes: int) -> list[Entry]:
    """The tensors a header describes, in data order; as strict as the library: known float dtypes only,
    offsets that tile the `data_bytes` of data exactly, sizes that match the shapes."""
    try:
        header = json.loads(bytes(text).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorDecodeError(f"payload is not valid safetensors: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise TensorDecodeError("payload is not valid safetensors: header is not a JSON object")
    header.pop("__metadata__", None)
    entries = sorted((_offsets(name, entry), name, entry) for name, entry in header.items())
    expected = 0
    out = []
    for (begin, end), name, entry in entries:
        if end > data_bytes:
            raise TensorDecodeError(f"payload is not valid safetensors: tensor {name!r} runs past the payload's end")
        if begin != expected:
            raise TensorDecodeError(f"payload is not valid safetensors: tensor {name!r} does not follow the previous")
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * dtype.itemsize:
            raise TensorDecodeError(f"payload is not valid safetensors: tensor {name!r} has {end - begin} bytes")
        out.append(Entry(name, dtype, shape, begin, end))
        expected = end
    if expected != data_bytes:
        raise TensorDecodeError(f"payload is not valid safetensors: {data_bytes - expected} bytes after the tensors")
    return out


def tensor_from(entry: Entry, raw: bytearray | memoryview) -> torch.Tensor:
    """The tensor of `entry` over `raw`, its bytes (shared, not copied)."""
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(raw, dtype=entry.dtype).view(entry.shape)


def split_payload(buffer: bytearray | memoryview) -> tuple[memoryview, list[Entry]]:
    """A safetensors payload's data section (a view, not a copy) and the tensors in it (see parse_header)."""
    view = memoryview(buffer).cast("B")
    n = header_length(view, len(view))
    data = view[8 + n :]
    return data, parse_header(view[8 : 8 + n], len(data))


def _offsets(name: str, entry: object) -> tuple[int, int]:
    if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES:
        raise TensorDecodeError(f"tensor {name!r} has dtype {entry['dtype']}; only float dtypes are accepted")
    ok = (
        isinstance(entry, dict)
        and set(entry) == {"dtype", "shape", "data_offsets"}
        and entry["dtype"] in DTYPES
        and isinstance(entry["shape"], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
        and isinstance(entry["data_offsets"], list)
        and len(entry["data_offsets"]) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["data_offsets"])
    )
    if not ok:
        raise TensorDecodeError(f"payload is not valid safetensors: tensor {name!r} has a malformed entry")
    assert isinstance(entry, dict)
    begin, end = entry["data_offsets"]
    if end < begin:
        raise TensorDecodeError(f"payload is not valid safetensors: tensor {name!r} ends before it begins")
    return int(begin), int(end)
