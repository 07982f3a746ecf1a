"""Payload helpers: integrity checks, dtype refusal, and the one-pass finiteness check."""

from __future__ import annotations

import pytest
import torch

import schemas.tensors as tensors_module
from schemas.errors import PayloadIntegrityError, TensorDecodeError
from schemas.tensors import decode_payload, decode_tensors, encode_tensors


def test_round_trip_and_integrity() -> None:
    data, info = encode_tensors({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)})
    out = decode_tensors(data, info)
    assert torch.equal(out["a"], torch.ones(2, 3)) and out["b"].dtype == torch.float16
    with pytest.raises(PayloadIntegrityError):
        decode_tensors(data[:-1] + b"\x01", info)
    with pytest.raises(TensorDecodeError, match="dtype"):
        decode_tensors(encode_tensors({"i": torch.ones(2, dtype=torch.int64)})[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_bad_value_in_any_tensor_and_dtype_makes_the_payload_not_finite(bad: float, dtype: torch.dtype) -> None:
    tensors = {f"t{i}": torch.randn(3, 5) for i in range(50)} | {"h": torch.randn(7, dtype=dtype)}
    assert decode_payload(encode_tensors(tensors)[0]).finite
    for name, index in (("t37", (2, 4)), ("t0", (0, 0)), ("t49", (2, 4)), ("h", (6,)), ("h", (0,))):
        broken = {k: v.clone() for k, v in tensors.items()}
        broken[name][index] = bad
        assert not decode_payload(encode_tensors(broken)[0]).finite, (name, index)


def test_finiteness_is_checked_across_batch_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensors_module, "_FINITE_BATCH", 7)  # batches that split tensors and runs
    tensors = {"a": torch.randn(5, 3), "b": torch.randn(11, dtype=torch.float64), "c": torch.randn(4)}
    assert decode_payload(encode_tensors(tensors)[0]).finite
    for name, size in (("a", 15), ("b", 11), ("c", 4)):
        for at in range(size):
            broken = {k: v.clone() for k, v in tensors.items()}
            broken[name].view(-1)[at] = float("nan")
            assert not decode_payload(encode_tensors(broken)[0]).finite, (name, at)


def test_decoded_tensors_are_writable_copies_of_a_bytes_payload() -> None:
    data, info = encode_tensors({"a": torch.ones(2, 3)})
    decoded = decode_payload(data, info)
    decoded.tensors["a"].mul_(2)  # must not write into the (immutable) bytes
    assert torch.equal(decode_tensors(data, info)["a"], torch.ones(2, 3))
