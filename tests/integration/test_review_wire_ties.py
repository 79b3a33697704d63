"""Outside review of the sync wire: tied names built byte by byte from the docs (review_wire.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.review_wire import (
    ENCODERS,
    INVALID,
    TIES,
    Lab,
    digest,
    opened_lab,
    tied_state,
    whole,
    without,
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with opened_lab(tmp_path_factory) as lab:
        yield lab


def test_tied_declarations_that_do_not_fit_are_refused(lab: Lab) -> None:
    m = lab.tied
    state = tied_state(m, 5)
    carried = {n: t for n, t in state.items() if n not in TIES}
    dropped = without(carried, "emb.weight")
    # fmt: off
    cases = [
        (carried, {**TIES, "head.weight": "head.weight"}, "head.weight"),  # itself
        (dropped, {**TIES, "emb.weight": "head.weight"}, "emb.weight"),  # a cycle
        (carried, {**TIES, "head.weight": "nope"}, "nope"),  # not a tensor
        (carried, {**TIES, "nope": "emb.weight"}, "nope"),
        (dropped, TIES, "emb.weight"),  # names one not carried
        ({**carried, "head.weight": state["emb.weight"]}, TIES, "head.weight"),  # both carried
        (without(carried, "mask"), {**TIES, "mask": "bn.running_mean"}, "mask"),  # dtype
        (without(carried, "bn.running_mean"), {**TIES, "bn.running_mean": "emb.weight"},
         "bn.running_mean"),  # shape
        (carried, {**TIES, "head.weight": 7}, "weightsync.tied"),
        (carried, {**TIES, "head.weight": ["emb.weight"]}, "weightsync.tied"),
        (carried, list(TIES), "weightsync.tied"),
        (carried, "null", "weightsync.tied"),
        (carried, "{", "weightsync.tied"),
        ({**carried, "head.weight": state["emb.weight"]},  # a cycle through a carried name
         {**TIES, "head.weight": "again.weight", "again.weight": "head.weight"}, "head.weight"),
    ]
    # fmt: on
    for c, t, fragment in cases:
        blob = whole(c, {"weightsync.tied": t if isinstance(t, str) else json.dumps(t)})
        m.refused(lambda b=blob: m.push(b, digest(state)), INVALID, fragment, what=t)
    m.commit_full(state, TIES)  # the right ties commit
    # a delta tying a name to one it does not carry (the base holds it: not enough)
    delta = whole(
        {"proj.weight": state["proj.weight"] + 1},
        {"weightsync.tied": json.dumps({"head.weight": "emb.weight"})},
    )
    m.refused(lambda: m.push(delta, digest(state), m.served().version), INVALID, "emb.weight")


def test_an_encoded_carried_tensor_gives_its_tied_names_the_decoded_bytes(lab: Lab) -> None:
    m = lab.tied
    new = dict(m.state)
    emb = m.state["emb.weight"].clone()
    emb[3, 2] += 1
    new["emb.weight"] = new["head.weight"] = emb
    data = ENCODERS["xor-lz4"](emb, m.state["emb.weight"])
    extra = {"weightsync.tied": json.dumps({"head.weight": "emb.weight"})}
    bad = dict(new, **{"head.weight": m.state["emb.weight"]})  # the tie left on the old bytes
    m.refused(
        lambda: m.delta({"emb.weight": ("xor-lz4", data)}, new, extra, digest(bad)),
        INVALID,
        "digest",
    )
    answer = m.delta({"emb.weight": ("xor-lz4", data)}, new, extra)
    assert answer.digest == digest(new) == m.served().digest
    m.state = new
