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

import functools
import hashlib
import itertools
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
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
# Headers up to this size are parsed once each and remembered (the newest _PARSED_HEADERS of them): a federation's
# updates of one rank carry the same header byte for byte, and parsing its few hundred entries again was a third of
# the Python work an aggregator does to check an update. Larger ones (and malformed ones) are parsed every time.
_CACHED_HEADER_BYTES = 256 * 1024
_PARSED_HEADERS = 64


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


def parse_header(text: bytes | bytearray | memoryview, data_bytes: int) -> tuple[Entry, ...]:
    """The tensors a header describes, in data order; as strict as the library: known float dtypes only,
    offsets that tile the `data_bytes` of data exactly, sizes that match the shapes."""
    raw = bytes(text)
    if len(raw) <= _CACHED_HEADER_BYTES:
        return _parsed(raw, data_bytes)
    return _parse(raw, data_bytes)


@functools.lru_cache(maxsize=_PARSED_HEADERS)
def _parsed(raw: bytes, data_bytes: int) -> tuple[Entry, ...]:
    """parse_header of a small header, remembered (what it raises is not: a refused header costs its parse)."""
    return _parse(raw, data_bytes)


def _parse(raw: bytes, data_bytes: int) -> tuple[Entry, ...]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested past the stack, a 5,000-digit number
        raise TensorDecodeError(f"payload is not valid safetensors: header is not JSON ({str(exc)[:200]})") from exc
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
    return tuple(out)


def tensor_from(entry: Entry, raw: bytearray | memoryview) -> torch.Tensor:
    """The tensor of `entry` over `raw`, its bytes (shared, not copied)."""
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(raw, dtype=entry.dtype).view(entry.shape)


def tensors_from(entries: Sequence[Entry], data: bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Every tensor of `entries` (parse_header's, which tile `data`, the data section, in order) over `data`'s bytes,
    shared, not copied: one buffer view per run of one dtype, each tensor a strided view of it. A frombuffer per
    tensor cost twice as much for the hundreds of small factors of an update."""
    out: dict[str, torch.Tensor] = {}
    for dtype, run in dtype_runs(entries):
        first, size = run[0].begin, dtype.itemsize
        if run[-1].end == first:  # only empty tensors: no buffer to view
            out.update((e.name, torch.empty(e.shape, dtype=dtype)) for e in run)
            continue
        flat = torch.frombuffer(data[first : run[-1].end], dtype=dtype)
        for e in run:
            out[e.name] = flat.as_strided(e.shape, _contiguous_strides(e.shape), (e.begin - first) // size)
    return out


def dtype_runs(entries: Sequence[Entry]) -> Iterator[tuple[torch.dtype, list[Entry]]]:
    """Consecutive tensors of one dtype: parse_header's entries tile the data in order, so each run is one range."""
    for dtype, run in itertools.groupby(entries, key=lambda e: e.dtype):
        yield dtype, list(run)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def split_payload(buffer: bytearray | memoryview) -> tuple[memoryview, tuple[Entry, ...]]:
    """A safetensors payload's data section (a view, not a copy) and the tensors in it (see parse_header)."""
    view = memoryview(buffer).cast("B")
    n = header_length(view, len(view))
    data = view[8 + n :]
    return data, parse_header(view[8 : 8 + n], len(data))


MAX_DIM = 2**31 - 1  # one side of a tensor; 2**63 beside a 0 made torch's empty tensor overflow


def _offsets(name: str, entry: object) -> tuple[int, int]:
    if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES:
        raise TensorDecodeError(f"tensor {name!r} has dtype {entry['dtype']}; only float dtypes are accepted")
    ok = (
        isinstance(entry, dict)
        and set(entry) == {"dtype", "shape", "data_offsets"}
        and entry["dtype"] in DTYPES
        and isinstance(entry["shape"], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in entry["shape"])
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
