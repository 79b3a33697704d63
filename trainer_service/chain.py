"""Chains: one push from the trainer feeds several replicas, each passing it on to the next.

Targets that hold the same delta base (the same acknowledged version and per-tensor hashes,
the writer lease held, none lagging) form a chain, in address order: the trainer sends one
push to the first, whose header names the others as its route; each replica forwards it as it
arrives, checks and commits it on its own, and the response says what became of it on every
hop (docs/sync.md, "How forwarding works"). So the trainer's link carries one copy, whatever
the number of replicas. A target that cannot join (first contact, or it lost its state: no
base; a hop that answers so too) is seeded once the push is committed: a target that
committed it pushes it the whole version (a Seed), so the trainer's link carries nothing for it
and the chain is not slowed by a full push beside it. Where no target can seed it (none
committed, none takes a delta, or catching up from peers is off), it is pushed alone.

From the response each hop is committed (its state recorded as if pushed directly), failed
or not reached. The replica before a failed hop routes the push past it
(inference_service/syncplane/forward.py), resuming the hops after it from what they hold, so
they come back committed like any hop. A fenced hop fails the sync as a direct push would. A
hop reported cut mid-push (`push-stalled`: it took nothing in time, or the link it had been
reached on was lost) lags at once: the background catch-up brings it up later, and the sync
does not wait for it. A hop the replica before it could not reach at all (UNAVAILABLE with no
reason: it could not dial it, or their TLS handshake failed) lags too, unless it answers the
trainer itself (`ask`): then it is pushed directly. A hop that lost its state (it no longer
knows the lease, or lacks the base) gets the whole version, seeded as above. Any
other failed hop is pushed directly at once, with the fallbacks, retries and deadlines a
direct push takes (docs/sync.md, "When things fail"); one that refuses fails the sync where a
direct push would. The hops not reached (past a failed one whose offset the
replica's replay window no longer held) are pushed again at once, in a new chain of the
remaining ones fed from the trainer.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import torch

from shared import protocol
from trainer_service.delivery import Delivery, Version
from trainer_service.push import Hop, Pushed, PushFailedError, TargetUnreachableError
from trainer_service.targets import Target

logger = logging.getLogger(__name__)


class Again(enum.Enum):
    """A target the push did not reach: push it again now, in a chain or on its own."""

    CHAINED = "chained"
    DIRECT = "direct"
    WHOLE = "whole"  # it has no base for a delta (it lost its state): the whole version


@dataclass(frozen=True)
class Refused:
    """A target that answered with a refusal (or whose push failed otherwise): the sync fails."""

    error: Exception


@dataclass(frozen=True)
class Unreached:
    """A hop the replica before it could not reach (`error`): it lags, unless the trainer
    reaches it itself (`ask`)."""

    error: PushFailedError


# What became of the push on one target: committed, lagging (why), refused, to ask, or to push
# again.
Outcome = Pushed | PushFailedError | Refused | Again | Unreached

# How the hop before it reports a hop that stalled (reason push-stalled: it lags at once) or
# could not be reached (it lags unless it answers the trainer itself, `ask`).
STALLED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})
# How a hop that restarted without its state refuses: it holds no base for a delta, nor the lease.
LOST_STATE = frozenset({protocol.BASE_VERSION_MISMATCH, protocol.UNKNOWN_EPOCH})


def plan(
    targets: Sequence[Target], tensors: Mapping[str, torch.Tensor], chained: bool = True
) -> tuple[list[list[Target]], list[Target]]:
    """The chains (two or more targets that share a delta base, in address order; more than
    a route may name make several chains) and the targets pushed on their own."""
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
    chains = [part for group in groups if len(group) > 1 for part in _split(group)]
    return chains, alone


def _split(group: list[Target]) -> list[list[Target]]:
    """`group` as chains whose routes a replica takes (protocol.MAX_ROUTE_HOPS hops at most),
    as even as can be, in address order."""
    count = -(-len(group) // (protocol.MAX_ROUTE_HOPS + 1))
    size, extra = divmod(len(group), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [group[start:end] for start, end in itertools.pairwise(bounds)]


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
            elif hop.version == version.number:  # what it committed is what the first did
                assert first.hashes is not None
                target.acknowledged(version.number, first.hashes)
                target.caught_up()
                outcomes.append((target, Pushed(0)))
            elif hop.reason == protocol.FENCED:
                outcomes.append((target, Refused(hop.error())))
            elif hop.code in STALLED and hop.reason == protocol.PUSH_STALLED:
                error = hop.error()  # it took nothing in time (cut, dark): the catch-up's
                target.fall_behind(error)
                outcomes.append((target, error))
            elif hop.code in STALLED:  # the hop before it could not reach it: can we?
                outcomes.append((target, Unreached(hop.error())))
            elif hop.reason in LOST_STATE:
                target.hashes = None
                if hop.reason == protocol.UNKNOWN_EPOCH:
                    target.epoch = None
                outcomes.append((target, Again.WHOLE))
            else:
                outcomes.append((target, Again.DIRECT))
        return outcomes


def ask(target: Target, unreached: Unreached, within_s: float) -> list[tuple[Target, Outcome]]:
    """A hop the replica before it could not reach (it could not dial it, or their TLS
    handshake failed): asked over the trainer's own link, within `within_s` (the trainer's
    connect timeout) or the time that link's watch gives a ping, whichever is shorter. One
    that does not answer (down, dark, stopped) lags: the catch-up's, not the sync's. One that
    answers was out of reach of the replica before it alone (a partition between them,
    replicas that cannot verify each other's certificates: their `--tls-peer-ca`) and is
    pushed directly, within the sync, as a live replica is. (A hop cut mid-push is not asked:
    it lags at once, and the sync waits for no look at a dark link.)"""
    with target.lock:
        answers = target.client.answers(target.model, within_s)
    if not answers:
        target.fall_behind(unreached.error)
        return [(target, unreached.error)]
    logger.warning(
        "model %s: %s was not reached through the chain, but answers the trainer: pushing it "
        "directly (the replica before it could not reach it: a partition between them, or "
        "peer TLS settings that do not verify it): %s",
        target.model,
        target.address,
        unreached.error,
    )
    return [(target, Again.DIRECT)]


def seed_one(
    delivery: Delivery, target: Target, donor: Target, version: Version
) -> list[tuple[Target, Outcome]]:
    """`target`, which has no base for a delta, seeded with `version` by `donor`, a target
    that committed it; pushed directly by the trainer where the seed does not take."""
    try:
        with target.lock:
            seeded = delivery.seed(target, donor, version)
    except TargetUnreachableError as error:
        target.fall_behind(error)
        return [(target, error)]
    except PushFailedError:
        seeded = False  # the direct push meets the same refusal and reports it
    if not seeded:
        return deliver_one(delivery, target, version)
    logger.info(
        "model %s: %s seeded with version %d by %s",
        target.model,
        target.address,
        version.number,
        donor.address,
    )
    target.caught_up(donor.address)
    return [(target, Pushed(0))]
