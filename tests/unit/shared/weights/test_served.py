"""The trainer's conversions to the served dtype (shared/weights/served.py `ServedCasts`):
bit-exact to `served_state`, written into memory an earlier version's conversion left only
once nothing refers to it any more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.weights.digest import byte_view
from shared.weights.served import ServedCasts, served_state


def trained(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38])
    return {
        "a": torch.cat([torch.randn(1000, generator=g) * 1e3, special]),
        "b": torch.randn(1006, generator=g),  # the same shape as `a`
        "m": torch.randn(8, 16, generator=g).t(),  # not contiguous
        "count": torch.arange(5),  # not floating: as it is
        "half": torch.randn(4, generator=g).to(torch.bfloat16),  # the served dtype already
    }


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_version_is_bit_exact_to_served_state_whatever_memory_it_takes(
    dtype: torch.dtype,
) -> None:
    casts = ServedCasts(dtype)
    for seed in range(6):
        weights = trained(seed)
        got, want = casts.state(weights), served_state(weights, dtype)
        assert list(got) == list(want)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
            assert bits(got[name]) == bits(tensor), name
        assert got["count"] is weights["count"]
        assert (got["half"] is weights["half"]) == (dtype == torch.bfloat16)


def test_memory_nothing_refers_to_is_written_again_and_memory_still_held_never() -> None:
    casts = ServedCasts(torch.bfloat16)
    first = casts.state(trained(0))
    addresses = {first[n].data_ptr() for n in ("a", "b", "m")}
    second = casts.state(trained(1))
    assert addresses.isdisjoint(second[n].data_ptr() for n in ("a", "b", "m"))
    kept = bits(first["a"]), bits(first["b"]), bits(first["m"])
    held = first["a"][10:], first["b"].view(torch.int16).numpy(), byte_view(first["m"].contiguous())
    del first
    third = casts.state(trained(2))  # every earlier tensor is still referred to: fresh memory
    assert (bits(held[0]), held[1].tobytes(), bytes(held[2])) == (
        kept[0][20:],
        kept[1],
        kept[2],
    )
    del held
    fourth = casts.state(trained(3))  # the first version's memory is free again: reused
    assert {fourth[n].data_ptr() for n in ("a", "b", "m")} == addresses
    assert bits(third["a"]) == bits(served_state(trained(2), torch.bfloat16)["a"])
    assert bits(second["b"]) == bits(served_state(trained(1), torch.bfloat16)["b"])


def test_tied_names_stay_tied_and_at_most_three_conversions_are_kept() -> None:
    casts = ServedCasts(torch.bfloat16)
    shared = torch.randn(32)
    held = []
    for _ in range(6):  # every version held: each takes memory of its own
        state = casts.state({"w": shared, "tied": shared, "x": torch.randn(32)})
        assert state["tied"] is state["w"]
        held.append(state)
    assert sum(len(kept) for kept in casts._kept.values()) == 3 * 2
    np.testing.assert_array_equal(held[0]["w"].float().numpy(), shared.bfloat16().float().numpy())
