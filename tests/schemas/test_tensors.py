"""Payload helpers: integrity checks, dtype refusal, and the one-pass finiteness check."""

from __future__ import annotations

import pytest
import torch

from schemas.errors import PayloadIntegrityError, TensorDecodeError
from schemas.tensors import all_finite, decode_tensors, encode_tensors


def test_round_trip_and_integrity() -> None:
    data, info = encode_tensors({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)})
    out = decode_tensors(data, info)
    assert torch.equal(out["a"], torch.ones(2, 3)) and out["b"].dtype == torch.float16
    with pytest.raises(PayloadIntegrityError):
        decode_tensors(data[:-1] + b"\x01", info)
    with pytest.raises(TensorDecodeError, match="dtype"):
        decode_tensors(encode_tensors({"i": torch.ones(2, dtype=torch.int64)})[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_a_bad_value_in_any_tensor_and_dtype(bad: float) -> None:
    tensors = {f"t{i}": torch.randn(3, 5) for i in range(50)} | {"h": torch.randn(7, dtype=torch.bfloat16)}
    assert all_finite(tensors)
    tensors["t37"][2, 4] = bad
    assert not all_finite(tensors)
    tensors["t37"][2, 4] = 0.0
    tensors["h"][3] = bad
    assert not all_finite(tensors)
