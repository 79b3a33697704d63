"""Tied tensors travel once: found on the sending side, declared in the header, given back
under every name on the receiving side (shared/weights/ties.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

from inference_service.served_model import ServedModel
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import Commit, PushHeader
from inference_service.syncplane.service import SyncPlane
from shared.app import ModelSpec, TensorSpec
from shared.errors import MalformedPushError, ServiceError
from shared.weights import digest
from shared.weights.digest import state_digest
from shared.weights.layout import TIED_KEY, TensorLayout, build_header, parse_header
from shared.weights.served import served_state
from shared.weights.ties import map_tied, tie_groups, ties
from shared.weights.writer import Payload
from trainer_service.hostcopy import host_copy


class Tied(nn.Module):
    """An output projection tied to the embedding, and two untied tensors of one layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.emb.weight
        self.a = nn.Parameter(torch.randn(16))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(x + self.a + self.b)
        return out


SPEC = ModelSpec(
    "m", lambda: None, (TensorSpec("x", "FP32", (-1, 16)),), (TensorSpec("y", "FP32", (-1, 64)),)
)  # type: ignore[arg-type,return-value]


def served() -> ServedModel:
    return ServedModel(SPEC, Tied(), lambda m, x: m(x), True, torch.device("cpu"))


def push(
    model: ServedModel, payload: Payload, digest: bytes, version: int = 1, base: int = 0
) -> None:
    plane = SyncPlane({"m": model}, SyncLimits(drain_timeout_s=1))
    parts: list[bytes | Commit] = [*payload.chunks(1000), Commit(digest)]
    plane.applier.apply(PushHeader("m", version, base, "w", payload.nbytes), iter(parts))


def stepped(module: nn.Module, step: float) -> dict[str, torch.Tensor]:
    """A new state of `module`'s kind with its ties (its parameters moved by `step`)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(step)
    return dict(module.state_dict())


def test_ties_name_each_later_name_of_a_tensor_and_nothing_else() -> None:
    state = Tied().state_dict()
    assert ties(state) == {"head.weight": "emb.weight"}
    assert tie_groups(state) == [["emb.weight", "head.weight"]]
    w = torch.zeros(4, 3)
    assert ties({"w": w, "t": w.t(), "empty": w[:0], "again": w[:0]}) == {}  # strides, no memory
    calls: list[str] = []
    out = map_tied(state, lambda name, t: calls.append(name) or t.clone())  # type: ignore[func-returns-value]
    assert calls == ["a", "b", "emb.weight"]
    assert out["head.weight"] is out["emb.weight"]


def test_copies_of_a_state_keep_its_ties() -> None:
    state = Tied().state_dict()
    for copy in (host_copy(state, ()), served_state(state, torch.bfloat16)):
        assert ties(copy) == {"head.weight": "emb.weight"}
        assert copy["emb.weight"].data_ptr() != state["emb.weight"].data_ptr()
        assert state_digest(copy) == state_digest({k: v.clone() for k, v in copy.items()})


def test_a_tied_tensor_travels_once_and_is_served_under_both_names_still_tied() -> None:
    model = served()
    state = stepped(Tied(), 0.5)
    payload = Payload.of_state(state)
    whole = Payload.of(list(state.items()))
    assert whole.nbytes - payload.nbytes >= 64 * 16 * 4  # the embedding once, not twice
    push(model, payload, state_digest(state))
    live = dict(model.live.module.state_dict())
    for name, tensor in state.items():
        assert torch.equal(live[name], tensor), name
    assert live["head.weight"].data_ptr() == live["emb.weight"].data_ptr()  # still tied
    assert model.live.digest == state_digest(state)

    newer = stepped(Tied(), 0.75)  # a delta on it, the tied pair changed
    delta = Payload.of([("emb.weight", newer["emb.weight"])], tied={"head.weight": "emb.weight"})
    push(model, delta, state_digest({**state, **newer, "a": state["a"], "b": state["b"]}), 2, 1)
    live = dict(model.live.module.state_dict())
    assert torch.equal(live["head.weight"], newer["emb.weight"])
    assert torch.equal(live["a"], state["a"])


def test_a_name_tied_in_the_push_but_not_in_the_model_is_given_the_tensor_it_names() -> None:
    model = served()
    state = stepped(Tied(), 1.0)
    sent = {k: v for k, v in state.items() if k not in ("b", "head.weight")}
    payload = Payload.of(list(sent.items()), tied={"b": "a", "head.weight": "emb.weight"})
    push(model, payload, state_digest({**state, "b": state["a"]}))
    live = dict(model.live.module.state_dict())
    assert torch.equal(live["b"], state["a"])
    assert live["b"].data_ptr() != live["a"].data_ptr()  # the model keeps its own tensors
    assert model.live.digest == state_digest({**state, "b": state["a"]})


LAYOUT = {
    "a": TensorLayout("F32", (4,)),
    "b": TensorLayout("F32", (4,)),
    "c": TensorLayout("F32", (2,)),
}


@pytest.mark.parametrize(
    ("tied", "message"),
    [
        ('{"a": "b"}', "tensor 'a' is carried, so it cannot also be tied to 'b'"),
        ('{"b": "c"}', "tensor 'b' (F32[4]) cannot hold 'c' (F32[2])"),
        ('{"b": "z"}', "unknown tensor 'z'"),
        ('{"z": "a"}', "unknown tensor 'z'"),
        ('{"b": 1}', "must be a JSON object mapping names to names"),
        ('["b", "a"]', "must be a JSON object mapping names to names"),
        ("{", "must be a JSON object mapping names to names"),
    ],
)
def test_a_tie_the_model_or_the_payload_cannot_hold_is_refused(tied: str, message: str) -> None:
    header, _ = build_header([("a", LAYOUT["a"])], {TIED_KEY: tied})
    with pytest.raises(MalformedPushError, match=r"weightsync\.tied") as caught:
        parse_header(header[8:], 16, LAYOUT)
    assert message in str(caught.value)


def test_a_tie_to_a_tensor_the_payload_does_not_carry_is_refused_and_nothing_changes() -> None:
    model = served()
    before = {k: v.clone() for k, v in model.live.module.state_dict().items()}
    state = stepped(Tied(), 1.0)
    payload = Payload.of([("a", state["a"])], tied={"b": "emb.weight"})
    with pytest.raises(MalformedPushError, match=r"cannot hold 'emb\.weight'"):
        push(model, payload, state_digest(state))
    payload = Payload.of([("a", state["a"])], tied={"emb.weight": "head.weight"})
    with pytest.raises(MalformedPushError, match="which the payload does not carry"):
        push(model, payload, state_digest(state))
    assert json.loads(payload.header[8:])["__metadata__"][TIED_KEY]
    live = model.live.module.state_dict()
    assert all(torch.equal(live[k], v) for k, v in before.items())
    assert model.live.version == 0


NAMES = ["emb.weight", "head.weight", "a", "b", "zz"]
# Each of the model's names carried (None) or declared tied to a name (maybe not the model's).
roles = st.fixed_dictionaries({n: st.one_of(st.none(), st.sampled_from(NAMES)) for n in NAMES[:4]})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(roles, st.dictionaries(st.sampled_from(NAMES), st.sampled_from(NAMES), max_size=1))
@example({"emb.weight": None, "head.weight": "emb.weight", "a": None, "b": "a"}, {})
def test_any_tie_declared_commits_exactly_what_it_says_or_changes_nothing(
    role: dict[str, str | None], extra: dict[str, str]
) -> None:
    """Whatever ties a sender declares over whatever it carries, the push commits the state
    where each tied name holds the tensor it names, or is refused with a domain error and the
    served weights stay as they were."""
    model = served()
    before = {k: v.clone() for k, v in model.live.module.state_dict().items()}
    new = {k: v + 1 + i for i, (k, v) in enumerate(before.items())}  # every name its own value
    tied = {**{n: s for n, s in role.items() if s is not None}, **extra}
    carried = [n for n in NAMES if role.get(n, "") is None]
    meant = {**before, **{n: new[n] for n in carried}}
    meant.update({n: meant[s] for n, s in tied.items() if n in meant and s in meant})
    payload = Payload.of([(n, new[n]) for n in carried], tied=tied)
    try:
        push(model, payload, state_digest(meant))
    except ServiceError:
        event("refused")
        expected = before
    else:
        event("committed")
        expected = meant
        assert all(tied.get(n, n) in carried for n in before)
    live = model.live.module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(live[name], tensor), name


@pytest.mark.parametrize("elements", [16, 3 << 20])  # on the caller's thread, on the pool
def test_a_state_is_hashed_each_tensor_once_to_the_hashes_of_its_tensors(
    elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {f"t{i}": torch.randn(elements) for i in range(3)}
    state["again"] = state["t1"]
    hashed: list[int] = []
    real = digest.tensor_hash
    monkeypatch.setattr(digest, "tensor_hash", lambda t: hashed.append(t.data_ptr()) or real(t))
    assert digest.tensor_hashes(state) == {k: real(v) for k, v in state.items()}
    assert sorted(hashed) == sorted(t.data_ptr() for k, t in state.items() if k != "again")
