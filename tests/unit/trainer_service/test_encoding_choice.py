"""The cost model that picks each changed tensor's encoding, and the base copies it encodes
against."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from shared.app import App
from shared.errors import ConfigurationError
from shared.weights.encoding import SPARSE, WHOLE, XOR_ZSTD, decode, encode_tensor
from shared.weights.served import serve_module, served_state
from shared.weights.writer import Payload
from tests.devices import devices
from trainer_service import metrics
from trainer_service.bases import KEEP, Bases
from trainer_service.encoding_choice import Encoded, EncodingChooser, host_bytes
from trainer_service.push import PushPlan

REMOTE = "10.1.2.3:50052"  # never dialled: only its address is looked at
LOOPBACK = "127.0.0.1:50052"


def versions(fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 tensor of 1 MiB and the next version, with `fraction` of its elements moved."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1 << 19, generator=g).bfloat16()
    moved = torch.rand(base.shape, generator=g) < fraction
    return torch.where(moved, base * 1.5 + 0.01, base), base


def decoded(data: bytes, encoding: str, base: torch.Tensor) -> bytes:
    out = np.empty(base.numel() * base.element_size(), np.uint8)
    decode(encoding, data, host_bytes(base), base.element_size(), out)
    return out.tobytes()


def test_loopback_takes_whole_bytes_and_keeps_no_base_in_auto() -> None:
    chooser = EncodingChooser("auto")
    assert not chooser.wants_bases(LOOPBACK)
    assert chooser.wants_bases(REMOTE)
    assert not EncodingChooser("whole").wants_bases(REMOTE)
    assert EncodingChooser("sparse").wants_bases(LOOPBACK)


def test_a_link_faster_than_any_encoder_gets_whole_bytes() -> None:
    chooser = EncodingChooser("auto")
    new, base = versions(0.03)
    chooser.record_push(REMOTE, 1 << 30, 0.01)  # 100 GB/s
    encoded = chooser.encode(REMOTE, [("w", new)], {"w": base})
    assert encoded.chosen == {"w": WHOLE}
    assert encoded.tensors == {}


def test_nothing_measured_yet_means_whole_bytes() -> None:
    new, base = versions(0.03)
    encoded = EncodingChooser("auto").encode(REMOTE, [("w", new)], {"w": base})
    assert encoded.chosen == {"w": WHOLE}


def test_a_slow_link_and_a_sparse_change_get_a_smaller_exact_encoding() -> None:
    chooser = EncodingChooser("auto")
    chooser.record_push(REMOTE, 1 << 20, 1.0)  # 1 MB/s
    new, base = versions(0.03)
    encoded = chooser.encode(REMOTE, [("w", new)], {"w": base})
    encoding, data = encoded.tensors["w"]
    assert encoding != WHOLE
    assert len(data) < new.numel() * 2 / 10
    assert decoded(data, encoding, base) == host_bytes(new).tobytes()


def test_a_dense_change_of_random_bits_stays_whole_even_on_a_slow_link() -> None:
    chooser = EncodingChooser("auto")
    chooser.record_push(REMOTE, 1 << 20, 1.0)
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-(2**15), 2**15 - 1, (1 << 19,), generator=g, dtype=torch.int16)
    new = torch.randint(-(2**15), 2**15 - 1, (1 << 19,), generator=g, dtype=torch.int16)
    encoded = chooser.encode(REMOTE, [("w", new)], {"w": base})
    assert encoded.chosen == {"w": WHOLE}


@pytest.mark.parametrize("forced", [SPARSE, XOR_ZSTD])
def test_a_forced_encoding_is_used_wherever_it_is_smaller(forced: str) -> None:
    chooser = EncodingChooser(forced)
    chooser.record_push(LOOPBACK, 1 << 30, 0.01)  # forced: even where whole bytes would win
    new, base = versions(0.03)
    tiny_new, tiny_base = torch.ones(2), torch.zeros(2)  # no encoding is smaller: whole
    encoded = chooser.encode(LOOPBACK, [("w", new), ("t", tiny_new)], {"w": base, "t": tiny_base})
    assert encoded.chosen == {"w": forced, "t": WHOLE}
    assert decoded(encoded.tensors["w"][1], forced, base) == host_bytes(new).tobytes()


def test_no_base_for_a_tensor_means_whole_bytes() -> None:
    new, _ = versions(0.03)
    assert EncodingChooser(SPARSE).encode(REMOTE, [("w", new)], {}).chosen == {"w": WHOLE}


def test_bases_share_unchanged_tensors_and_keep_the_newest_versions() -> None:
    bases = Bases()
    a, b = torch.zeros(4), torch.ones(4)
    bases.keep("m", 1, {"a": a, "b": b}, {"a": b"1", "b": b"1"})
    a2 = torch.full((4,), 2.0)
    bases.keep("m", 2, {"a": a2, "b": b}, {"a": b"2", "b": b"1"})
    one, two = bases.get("m", 1), bases.get("m", 2)
    assert one is not None and two is not None
    assert two["b"] is one["b"]  # unchanged: shared
    assert torch.equal(two["a"], a2) and two["a"].data_ptr() != a2.data_ptr()  # a copy
    a2.fill_(7.0)  # the trainer's tensors move on; the kept copy does not
    assert torch.equal(two["a"], torch.full((4,), 2.0))
    for version in range(3, 3 + KEEP):
        bases.keep("m", version, {"a": a, "b": b}, {"a": str(version).encode(), "b": b"1"})
    assert bases.get("m", 2) is None and bases.get("m", 2 + KEEP) is not None


def test_served_dtype_converts_floating_tensors_only_the_same_way_on_both_sides() -> None:
    module = torch.nn.Linear(3, 2)
    module.register_buffer("steps", torch.arange(3))
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    served = served_state(state, torch.bfloat16)
    assert served["weight"].dtype == torch.bfloat16 and served["steps"].dtype == torch.int64
    serve_module(module, torch.bfloat16)
    for name, tensor in module.state_dict().items():
        assert tensor.dtype == served[name].dtype
        assert torch.equal(tensor, served[name])
    assert served_state(state, None) == state


def test_an_app_refuses_a_served_dtype_that_is_not_floating() -> None:
    with pytest.raises(ConfigurationError, match=r"served_dtype torch\.int8 is not a floating"):
        App().add_model("m", lambda: None, served_dtype=torch.int8)  # type: ignore[arg-type,return-value]


def encoded_total() -> float:
    return sum(
        sample.value
        for family in metrics.ENCODED_BYTES.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def test_targets_taking_the_same_version_on_the_same_base_share_one_encode() -> None:
    chooser = EncodingChooser("auto")
    other = "10.1.2.4:50052"
    for address in (REMOTE, other):
        chooser.record_push(address, 1 << 20, 1.0)  # 1 MB/s each
    new, base = versions(0.03)
    before = encoded_total()
    results: list[Encoded] = []
    threads = [
        threading.Thread(
            target=lambda a=address: results.append(
                chooser.encode(a, [("w", new)], {"w": base}, ("m", 2, 1))
            )
        )
        for address in (REMOTE, other)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert encoded_total() - before == new.numel() * 2  # encoded once, for both
    assert sorted(r.reused for r in results) == [0, 1]
    assert results[0].tensors == results[1].tensors
    encoding, data = results[0].tensors["w"]
    assert decoded(data, encoding, base) == host_bytes(new).tobytes()
    # Another base, or a newer version, is encoded anew; an older version is not shared.
    assert chooser.encode(REMOTE, [("w", new)], {"w": base}, ("m", 2, 0)).reused == 0
    assert chooser.encode(REMOTE, [("w", new)], {"w": base}, ("m", 3, 1)).reused == 0
    assert chooser.encode(other, [("w", new)], {"w": base}, ("m", 3, 1)).reused == 1
    assert chooser.encode(other, [("w", new)], {"w": base}, ("m", 2, 1)).reused == 0
    assert encoded_total() - before == 4 * new.numel() * 2


@pytest.mark.parametrize("device", devices())
def test_a_trainers_tensors_are_encoded_against_base_copies_on_its_device(device: str) -> None:
    new, base = (t.to(device) for t in versions(0.03))
    bases = Bases()
    bases.keep("m", 1, {"w": base}, {"w": b"1"})
    kept = bases.get("m", 1)
    assert kept is not None and kept["w"].device == base.device
    assert kept["w"].data_ptr() != base.data_ptr()  # a copy
    encoded = EncodingChooser(SPARSE).encode(REMOTE, [("w", new)], kept)
    assert decoded(encoded.tensors["w"][1], SPARSE, base.cpu()) == host_bytes(new).tobytes()


def dense_versions(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 tensor of 1 MiB and the next version, every element moved."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1 << 19, generator=g).bfloat16()
    return base * 1.5 + 0.01, base


def test_a_dense_change_is_named_so_and_a_sparse_one_is_not() -> None:
    chooser = EncodingChooser("auto")
    chooser.record_push(REMOTE, 1 << 20, 1.0)
    dense_new, dense_base = dense_versions()
    new, base = versions(0.03)
    encoded = chooser.encode(
        REMOTE, [("d", dense_new), ("s", new)], {"d": dense_base, "s": base}, ("m", 2, 1)
    )
    assert encoded.chosen["d"] == WHOLE and encoded.chosen["s"] != WHOLE
    assert encoded.dense == {"d"}
    assert chooser.dense("m") == {"d"} and chooser.dense("other") == set()
    # Not measured (no link rate yet, a forced encoding): never named dense.
    assert (
        EncodingChooser("auto").encode(REMOTE, [("d", dense_new)], {"d": dense_base}).dense == set()
    )
    forced = EncodingChooser(SPARSE).encode(REMOTE, [("d", dense_new)], {"d": dense_base})
    assert forced.dense == set()


@pytest.mark.parametrize("device", devices())
def test_a_tensor_kept_as_a_probe_travels_whole_and_its_change_is_measured_on_the_probe(
    device: str,
) -> None:
    chooser = EncodingChooser("auto")
    chooser.record_push(REMOTE, 1 << 20, 1.0)
    dense_new, dense_base = (t.to(device) for t in dense_versions())
    bases = Bases()
    bases.keep("m", 1, {"w": dense_base}, {"w": b"1"}, probed={"w"})
    assert bases.get("m", 1) == {}  # no copy of it: a probe only
    probes = bases.probes("m", 1)
    assert probes["w"].numel() == 16 * 4096  # 16 blocks of 4096 elements, of 512 Ki
    assert probes["w"].device == dense_base.device
    encoded = chooser.encode(REMOTE, [("w", dense_new)], {}, ("m", 2, 1), probes)
    assert encoded.chosen == {"w": WHOLE} and encoded.dense == {"w"}
    # The change turns sparse: measured on the probe, it is no longer dense, so the next
    # version is kept whole and the delta after it travels encoded.
    moved = torch.rand(dense_base.shape).to(device) < 0.03
    sparse_new = torch.where(moved, dense_base * 2, dense_base)
    encoded = chooser.encode(REMOTE, [("w", sparse_new)], {}, ("m", 3, 1), probes)
    assert encoded.chosen == {"w": WHOLE} and encoded.dense == set()
    assert chooser.dense("m") == set()
    bases.keep("m", 3, {"w": sparse_new}, {"w": b"3"}, probed=chooser.dense("m"))
    kept = bases.get("m", 3)
    assert kept is not None and torch.equal(kept["w"], sparse_new)
    moved = torch.rand(sparse_new.shape).to(device) < 0.03
    later = torch.where(moved, sparse_new * 2, sparse_new)
    encoded = chooser.encode(REMOTE, [("w", later)], kept, ("m", 4, 3), bases.probes("m", 3))
    encoding, data = encoded.tensors["w"]
    assert decoded(data, encoding, sparse_new.cpu()) == host_bytes(later).tobytes()


def test_a_tensor_whose_probe_differs_is_known_changed_without_hashing_it() -> None:
    """What the trainer need not hash before a push: a tensor kept as a probe whose sample of
    the new version differs from it. A tensor kept whole, or one whose sample matches (its
    change lies outside the sample), is not known changed: it is hashed as before."""
    new, base = dense_versions()
    bases = Bases()
    kept = torch.arange(1 << 18, dtype=torch.int32)
    bases.keep("m", 1, {"w": base, "u": kept, "c": kept.clone()}, {}, probed={"w", "u"})
    outside = kept.clone()
    outside[-1] = -1  # past the last sampled block's first elements
    now = {"w": new, "u": outside, "c": kept + 1}
    assert bases.differing("m", 1, now) == {"w"}
    assert bases.differing("m", 1, {**now, "u": kept.to(torch.int16)}) == {"w", "u"}
    assert bases.differing("m", 2, now) == set()  # no such version kept


def test_an_unchanged_probe_is_shared_and_a_probe_is_a_copy() -> None:
    bases = Bases()
    w = torch.arange(1 << 18, dtype=torch.int32)
    bases.keep("m", 1, {"w": w}, {"w": b"1"}, probed={"w"})
    bases.keep("m", 2, {"w": w}, {"w": b"1"}, probed={"w"})
    assert bases.probes("m", 2)["w"] is bases.probes("m", 1)["w"]
    before = bases.probes("m", 1)["w"].clone()
    w.fill_(-1)  # the trainer's tensors move on; the probe does not
    assert torch.equal(bases.probes("m", 1)["w"], before)


@pytest.mark.parametrize("device", devices())
def test_an_owned_tensor_is_kept_as_it_is_and_the_others_are_copied(device: str) -> None:
    bases = Bases()
    owned = torch.zeros(4, dtype=torch.bfloat16, device=device)
    trained = torch.ones(4, device=device)
    bases.keep("m", 1, {"o": owned, "t": trained}, {"o": b"1", "t": b"1"}, owned={"o"})
    kept = bases.get("m", 1)
    assert kept is not None
    assert kept["o"].data_ptr() == owned.data_ptr()  # handed over: no copy
    assert kept["t"].data_ptr() != trained.data_ptr()  # the trainer's own: a copy


def test_a_push_measures_its_link_less_what_its_encoded_tensors_take_to_decode() -> None:
    # The cost model charges decoding on its own: counted into the link's seconds too, a
    # small delta (mostly decoding) made the link look several times slower than it is.
    chooser = EncodingChooser()
    speeds = chooser.calibrate()
    new, base = versions(0.05)
    data = encode_tensor(SPARSE, new, base)
    assert data is not None and len(data) >= 1 << 16  # large enough to measure a link
    payload = Payload.of([("w", new)], encoded={"w": (SPARSE, data)})
    plan = PushPlan("m", 2, 1, "trainer", payload, 1, b"")
    decoding = new.numel() * new.element_size() / speeds.decode_speed(SPARSE)
    chooser.pushed(plan, REMOTE, decoding + 0.5)
    assert chooser.describe_link(REMOTE) == f"{payload.nbytes / 0.5 / 1e6:.1f} MB/s"
    # Seconds the decoding estimate (nearly) all explains say nothing of the link.
    other = "10.1.2.4:50052"
    chooser.pushed(plan, other, decoding * 1.05)
    assert chooser.describe_link(other) == "not measured yet"
    whole = Payload.of([("w", new)])  # nothing to decode: the push's own seconds
    chooser.pushed(PushPlan("m", 3, 2, "trainer", whole, 1, b""), other, 0.25)
    assert chooser.describe_link(other) == f"{whole.nbytes / 0.25 / 1e6:.1f} MB/s"


def test_a_push_measures_its_link_on_its_stream_where_the_target_says_how_long_it_took() -> None:
    # A replica decodes while the stream goes on: what is left after the push's last message
    # (PushResponse.finish_seconds) is what the stream did not take; the decoding estimate,
    # all of it subtracted, made a 1 Gbit/s link look up to three times as fast.
    chooser = EncodingChooser()
    speeds = chooser.calibrate()
    new, base = versions(0.05)
    data = encode_tensor(SPARSE, new, base)
    assert data is not None
    payload = Payload.of([("w", new)], encoded={"w": (SPARSE, data)})
    plan = PushPlan("m", 2, 1, "trainer", payload, 1, b"")
    decoding = new.numel() * new.element_size() / speeds.decode_speed(SPARSE)
    chooser.pushed(plan, REMOTE, decoding + 0.5, finish_s=0.1)
    assert chooser.describe_link(REMOTE) == f"{payload.nbytes / (decoding + 0.4) / 1e6:.1f} MB/s"
    other = "10.1.2.4:50052"  # a finish longer than the push itself is no measure: as before
    chooser.pushed(plan, other, decoding + 0.5, finish_s=decoding + 0.6)
    assert chooser.describe_link(other) == f"{payload.nbytes / 0.5 / 1e6:.1f} MB/s"
