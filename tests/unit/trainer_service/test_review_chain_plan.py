"""Chain planning for a deployment with more replicas than a route may name."""

from __future__ import annotations

from inference_service.syncplane.forward import MAX_HOPS
from tests.unit.trainer_service.test_chain import HASHES, TENSORS
from trainer_service import chain
from trainer_service.push import SyncClient
from trainer_service.targets import Target


def test_more_replicas_than_a_route_may_name_are_fed_through_several_chains() -> None:
    """Every chain's route is one the replica it is pushed to takes (at most MAX_HOPS hops);
    every target is fed, each once."""
    # Channels connect lazily: nothing needs to listen at these addresses.
    clients = [SyncClient(f"10.0.{i // 250}.{i % 250 + 1}:9001", 5.0) for i in range(600)]
    try:
        targets = [Target(c, "m", epoch=7, version=1, hashes=dict(HASHES)) for c in clients]
        chains, alone = chain.plan(targets, TENSORS)
        assert chains
        assert all(len(chain.route(c)) <= MAX_HOPS for c in chains)
        fed = [t.address for c in chains for t in c] + [t.address for t in alone]
        assert sorted(fed) == sorted(t.address for t in targets)
        assert len(alone) <= 1
    finally:
        for client in clients:
            client.close()
