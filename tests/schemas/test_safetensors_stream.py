"""The streaming safetensors codec against the library itself: the same bytes written, the same tensors
read, and every malformed payload the library refuses refused here too."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from schemas.chunks import ChunkInfo, check_chunk, chunk_count
from schemas.errors import PayloadIntegrityError, SchemaError, TensorDecodeError
from schemas.messages import PayloadInfo
from schemas.safetensors_stream import describe, encode_pieces, iter_chunks
from schemas.tensors import decode_tensors, encode_tensors, sha256_hex

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

tensor_dicts = st.dictionaries(
    # "__metadata__" names the header's metadata: the library writes a tensor of that name but refuses to read it
    # back, and so does the codec (MALFORMED below).
    st.text("abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=12).filter(lambda n: n != "__metadata__"),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)),
    min_size=1,
    max_size=6,
)


def _build(spec: dict[str, tuple[torch.dtype, list[int]]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(spec))
    return {name: torch.randn(tuple(shape), generator=gen).to(dtype) for name, (dtype, shape) in spec.items()}


@settings(max_examples=60, deadline=None)
@given(tensor_dicts)
def test_the_written_bytes_are_the_librarys_and_read_back_as_views(
    spec: dict[str, tuple[torch.dtype, list[int]]],
) -> None:
    tensors = _build(spec)
    data, info = encode_tensors(tensors)
    assert data == st_save(tensors)
    assert info == PayloadInfo(size=len(data), sha256=sha256_hex(data))
    buffer = bytearray(data)
    viewed = decode_tensors(buffer)
    assert set(viewed) == set(tensors)
    for name, tensor in tensors.items():
        assert viewed[name].dtype == tensor.dtype and torch.equal(viewed[name], tensor)
        assert viewed[name].is_contiguous() and viewed[name].shape == tensor.shape


def test_read_tensors_share_the_buffer_rather_than_copy_it() -> None:
    buffer = bytearray(st_save({"w": torch.zeros(1000)}))
    w = decode_tensors(buffer)["w"]
    buffer[-4:] = struct.pack("<f", 7.0)
    assert w[-1].item() == 7.0


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1000, 10**6])
def test_chunks_cut_the_pieces_exactly(chunk_bytes: int) -> None:
    tensors = {"a": torch.randn(37, 11), "b": torch.randn(5, dtype=torch.float16)}
    size, pieces = encode_pieces(tensors)
    whole = b"".join(pieces)
    chunks = list(iter_chunks(pieces, chunk_bytes))
    assert b"".join(chunks) == whole and len(chunks) == chunk_count(size, chunk_bytes)
    assert all(len(c) == chunk_bytes for c in chunks[:-1])
    assert describe(pieces, size).sha256 == sha256_hex(whole)


def _with_header(header: object, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _raw_header(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


MALFORMED = {
    "shorter than the length": b"\x01\x00",
    "header past the end": struct.pack("<Q", 10**6) + b"{}",
    "not JSON": struct.pack("<Q", 4) + b"{{{{",
    "gap before a tensor": _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
    "overlapping tensors": _with_header(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        },
        b"\0" * 8,
    ),
    "size disagrees with shape": _with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "bytes after the tensors": _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
    "shape claims a huge tensor": _with_header(
        {"a": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "missing data": _with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "negative offset": _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
    "a tensor named __metadata__": st_save({"__metadata__": torch.zeros(2)}),
    # these three were dead-lettered "internal" (RecursionError, Python's digit limit, torch's overflow)
    "header nested past the stack": _raw_header(b"[" * 100_000 + b"]" * 100_000),
    "a 5,000-digit number": _raw_header(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}'),
    "an empty tensor beside a side of 2**63": _with_header(
        {"a": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, b""
    ),
    "a tensor and one named __metadata__": st_save({"a": torch.zeros(1), "__metadata__": torch.zeros(1)}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_payloads_are_refused_as_the_library_refuses_them(name: str) -> None:
    data = MALFORMED[name]
    with pytest.raises(Exception):  # noqa: B017 - the library's own error types vary by case
        st_load(data)
    with pytest.raises(TensorDecodeError):
        decode_tensors(bytearray(data))
    with pytest.raises(TensorDecodeError):
        decode_tensors(data)


def test_a_header_seen_before_is_still_checked_against_each_payloads_data() -> None:
    # Headers are parsed once and remembered: the same header over data of another length is still refused, and a
    # refused header is refused again (not remembered as sound).
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    assert decode_tensors(_with_header(header, struct.pack("<f", 1.5)))["a"].item() == 1.5
    for _ in range(2):
        with pytest.raises(TensorDecodeError, match="bytes after the tensors"):
            decode_tensors(_with_header(header, b"\0" * 8))
        with pytest.raises(TensorDecodeError, match="runs past"):
            decode_tensors(_with_header({"a": {**header["a"], "data_offsets": [0, 8]}, "__metadata__": {}}, b"\0" * 4))
    assert decode_tensors(_with_header(header, struct.pack("<f", 2.5)))["a"].item() == 2.5


def test_integer_tensors_are_refused_on_both_paths() -> None:
    data = st_save({"i": torch.ones(2, dtype=torch.int32)})
    with pytest.raises(TensorDecodeError):
        decode_tensors(bytearray(data))
    with pytest.raises(TensorDecodeError, match="dtype"):
        decode_tensors(data)


def _chunk(index: int, count: int, body: bytes, chunk_bytes: int = 64 * 1024) -> ChunkInfo:
    import hashlib

    return ChunkInfo(
        transfer_id="update-0001",
        index=index,
        count=count,
        chunk_bytes=chunk_bytes,
        sha256=hashlib.sha256(body).hexdigest(),
    )


def test_a_chunk_must_fit_its_place_and_its_hash() -> None:
    cb = 64 * 1024
    payload = PayloadInfo(size=2 * cb + 10, sha256="0" * 64)
    full, last = b"x" * cb, b"y" * 10
    check_chunk(_chunk(0, 3, full), full, payload)
    check_chunk(_chunk(2, 3, last), last, payload)
    with pytest.raises(SchemaError, match="does not fit"):
        check_chunk(_chunk(0, 4, full), full, payload)  # the count disagrees with the size
    with pytest.raises(PayloadIntegrityError, match="its place holds"):
        check_chunk(_chunk(1, 3, last), last, payload)  # a short chunk that is not the last
    info = _chunk(0, 3, full)
    with pytest.raises(PayloadIntegrityError, match="sha256"):
        check_chunk(info, b"z" + full[1:], payload)
