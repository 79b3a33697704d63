"""Tensor hashes and byte views read a tensor's values as they are, whatever it is a view of."""

from __future__ import annotations

import gc

import pytest
import torch
import xxhash

from shared.weights.digest import DigestTable, byte_view, model_digest, tensor_hash
from shared.weights.layout import TensorLayout

COMPLEX = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
CASES = {
    "fp32": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "bf16": torch.arange(12, dtype=torch.float32).to(torch.bfloat16),
    "empty": torch.zeros(0),
    "empty_strided": torch.zeros(0, 3).t(),
    "scalar": torch.tensor(3),
    "transposed": torch.arange(16, dtype=torch.float32).reshape(4, 4).t(),
    "sliced": torch.arange(16, dtype=torch.float32)[1::3],
    "conjugated": COMPLEX.conj(),  # lazily: its memory holds the values unconjugated
    "negated": torch._neg_view(torch.arange(4, dtype=torch.float32)),  # lazily, contiguous
    "negated_strided": COMPLEX.conj().imag,  # a lazily negated view of a real tensor
    "bool": torch.tensor([True, False, True]),
    "requires_grad": torch.ones(3, requires_grad=True),
}


def _expected(tensor: torch.Tensor) -> bytes:
    values = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return values.view(torch.uint8).numpy().tobytes() if values.numel() else b""


@pytest.mark.parametrize("name", list(CASES))
def test_a_tensor_hash_is_the_hash_of_its_values_bytes(name: str) -> None:
    tensor = CASES[name]
    assert tensor_hash(tensor) == xxhash.xxh3_128_digest(_expected(tensor))


@pytest.mark.parametrize("name", list(CASES))
def test_a_byte_view_holds_a_contiguous_tensors_values(name: str) -> None:
    tensor = CASES[name].detach().contiguous()
    assert bytes(byte_view(tensor)) == _expected(tensor)


def test_a_byte_view_keeps_its_tensor_alive() -> None:
    view = byte_view(torch.arange(1 << 16, dtype=torch.int32))  # nothing else holds it
    gc.collect()
    [torch.full((1 << 16,), -1, dtype=torch.int32) for _ in range(8)]  # reuse freed memory
    assert bytes(view) == _expected(torch.arange(1 << 16, dtype=torch.int32))


def test_a_byte_view_refuses_a_tensor_it_would_have_to_copy() -> None:
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        byte_view(CASES["transposed"])


def test_a_digest_table_digests_as_the_table_of_layouts_and_hashes() -> None:
    state = {name: CASES[name] for name in ("fp32", "bf16", "scalar", "empty")}
    layouts = {name: TensorLayout.of(t) for name, t in state.items()}
    hashes = {name: tensor_hash(t) for name, t in state.items()}
    table = DigestTable(layouts)
    expected = xxhash.xxh3_128()
    for name in sorted(state):  # the construction docs/sync.md gives
        shape = ",".join(map(str, layouts[name].shape))
        expected.update(f"{name}\0{layouts[name].dtype}\0{shape}\0".encode() + hashes[name])
    assert table.digest(hashes) == expected.digest()
    assert model_digest({n: (layouts[n], hashes[n]) for n in state}) == expected.digest()
    with pytest.raises(ValueError, match="3 hashes for a layout of 4 tensors"):
        table.digest({n: hashes[n] for n in ("fp32", "bf16", "scalar")})
