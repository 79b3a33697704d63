"""Chains: one push from the trainer feeds several replicas, each passing it on to the next.

Targets that hold the same delta base (the same acknowledged version and per-tensor hashes,
the writer lease held, none lagging) form a chain, in address order: the trainer sends one
push to the first, whose header names the others as its route; each replica forwards it as it
arrives, checks and commits it on its own, and the response says what became of it on every
hop (docs/sync.md, "How forwarding works"). So the trainer's link carries one copy, whatever
the number of replicas. Targets that cannot join (first contact, no base) are pushed alone.

From the response each hop is committed (its state recorded as if pushed directly), failed
or not reached (a hop before it failed). A fenced hop fails the sync as a direct push would. A
hop reported stalled or unreachable (DEADLINE_EXCEEDED, UNAVAILABLE: cut, dark or down) lags at
once: the background catch-up brings it up later, and the sync does not wait for it. The
replica before such a hop routes the push past it (inference_service/syncplane/forward.py),
resuming the hops after it from what they hold, so they come back committed like any hop. Any
other failed hop is pushed directly at once, with the fallbacks, retries and deadlines a direct
push takes (docs/sync.md, "When things fail"); one that refuses fails the sync where a direct
push would. The hops not reached (after a hop that refused, or past a cut one whose offset the
replica's replay window no longer held) are pushed again at once, in a new chain of the
remaining ones fed from the trainer.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import torch

from shared import protocol
from trainer_service.delivery import Delivery, Version
from trainer_service.push import Hop, Pushed, PushFailedError
from trainer_service.targets import Target


class Again(enum.Enum):
    """A target the push did not reach: push it again now, in a chain or on its own."""

    CHAINED = "chained"
    DIRECT = "direct"


@dataclass(frozen=True)
class Refused:
    """A target that answered with a refusal (or whose push failed otherwise): the sync fails."""

    error: Exception


# What became of the push on one target: committed, lagging (why), refused, or to push again.
Outcome = Pushed | PushFailedError | Refused | Again

# How the hop before it reports a hop that stalled or could not be reached: it lags at once.
STALLED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})


def plan(
    targets: Sequence[Target], tensors: Mapping[str, torch.Tensor], chained: bool = True
) -> tuple[list[list[Target]], list[Target]]:
    """The chains (two or more targets that share a delta base, in address order) and the
    targets pushed on their own."""
    if not chained:
        return [], list(targets)
    groups: list[list[Target]] = []
    alone: list[Target] = []
    for target in sorted(targets, key=lambda t: t.address):
        if target.epoch is None or target.lagging or target.delta_base(tensors) is None:
            alone.append(target)
            continue
        for group in groups:
            if group[0].version == target.version and group[0].hashes == target.hashes:
                group.append(target)
                break
        else:
            groups.append([target])
    alone += [group[0] for group in groups if len(group) == 1]
    return [group for group in groups if len(group) > 1], alone


def route(chain: Sequence[Target]) -> tuple[Hop, ...]:
    """The hops after the chain's first target, as its push's header names them."""
    hops = []
    for target in chain[1:]:
        assert target.epoch is not None
        hops.append(Hop(target.address, target.client.server_name, target.epoch))
    return tuple(hops)


def deliver_one(
    delivery: Delivery, target: Target, version: Version, hops: tuple[Hop, ...] = ()
) -> list[tuple[Target, Outcome]]:
    """A push to one target (which passes it on down `hops`)."""
    try:
        return [(target, delivery.deliver(target, version, hops))]
    except Exception as error:
        return [(target, Refused(error))]


def deliver_chain(
    delivery: Delivery, chain: Sequence[Target], version: Version
) -> list[tuple[Target, Outcome]]:
    """One push to the chain's first target, passed on down the rest; what became of it on
    each target of the chain."""
    first, rest = chain[0], chain[1:]
    with contextlib.ExitStack() as held:  # no catch-up or other push touches them meanwhile
        for target in rest:
            held.enter_context(target.lock)
        [(_, outcome)] = deliver_one(delivery, first, version, route(chain))
        if not isinstance(outcome, Pushed):
            return [(first, outcome), *((target, Again.CHAINED) for target in rest)]
        outcomes: list[tuple[Target, Outcome]] = [(first, outcome)]
        results = {hop.address: hop for hop in outcome.hops}
        for target in rest:
            hop = results.get(target.address)
            if hop is None:
                outcomes.append((target, Again.CHAINED))
            elif hop.version == version.number:
                assert version.hashes is not None  # a chain forms only where deltas can go
                target.acknowledged(version.number, version.hashes)
                target.caught_up()
                outcomes.append((target, Pushed(0)))
            elif hop.reason == protocol.FENCED:
                outcomes.append((target, Refused(hop.error())))
            elif hop.code in STALLED:  # cut or dark: the catch-up's, not the sync's
                error = hop.error()
                target.fall_behind(error)
                outcomes.append((target, error))
            else:
                outcomes.append((target, Again.DIRECT))
        return outcomes
