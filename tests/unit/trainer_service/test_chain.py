"""Chain planning, and one push fed down a chain of real in-process inference services."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from tests.unit.trainer_service.test_publisher import Target as Replica
from tests.unit.trainer_service.test_publisher import fresh
from trainer_service import chain
from trainer_service.publisher import Publisher
from trainer_service.push import Hop, PushFailedError, SyncClient
from trainer_service.sync_errors import WriterFencedError
from trainer_service.targets import Target

TENSORS = {"a": torch.zeros(2), "b": torch.ones(2)}
HASHES = {"a": b"1", "b": b"2"}


@pytest.fixture
def clients() -> Iterator[list[SyncClient]]:
    # Channels connect lazily: nothing needs to listen at these addresses.
    made = [SyncClient(f"10.0.0.{i}:9001", 5.0, server_name=f"replica{i}") for i in (3, 1, 2, 4)]
    yield made
    for client in made:
        client.close()


def target(client: SyncClient, epoch: int | None = 7, version: int = 1) -> Target:
    return Target(client, "m", epoch=epoch, version=version, hashes=dict(HASHES))


def addresses(targets: list[Target]) -> list[str]:
    return [t.address for t in targets]


def test_targets_that_share_a_base_form_one_chain_in_address_order(
    clients: list[SyncClient],
) -> None:
    targets = [target(c) for c in clients[:3]]
    chains, alone = chain.plan(targets, TENSORS)
    assert [addresses(c) for c in chains] == [["10.0.0.1:9001", "10.0.0.2:9001", "10.0.0.3:9001"]]
    assert alone == []
    assert chain.route(chains[0]) == (
        Hop("10.0.0.2:9001", "replica2", 7),
        Hop("10.0.0.3:9001", "replica3", 7),
    )


def test_targets_that_cannot_take_the_same_delta_are_pushed_alone(
    clients: list[SyncClient],
) -> None:
    first_contact = target(clients[0], epoch=None)
    other_base = target(clients[1], version=2)
    lagging = target(clients[2])
    lagging.lagging_since = 1.0
    no_hashes = Target(clients[3], "m", epoch=7, version=1)
    chains, alone = chain.plan([first_contact, other_base, lagging, no_hashes], TENSORS)
    assert chains == []
    assert sorted(addresses(alone)) == sorted(c.target for c in clients)


def test_groups_with_different_bases_make_different_chains(clients: list[SyncClient]) -> None:
    targets = [target(clients[0]), target(clients[1]), target(clients[2], version=2)]
    targets.append(target(clients[3], version=2))
    chains, alone = chain.plan(targets, TENSORS)
    assert [addresses(c) for c in chains] == [
        ["10.0.0.1:9001", "10.0.0.3:9001"],
        ["10.0.0.2:9001", "10.0.0.4:9001"],
    ]
    assert alone == []
    assert chain.plan(targets, TENSORS, chained=False) == ([], targets)


@pytest.mark.parametrize("fanout", ["chain", "direct"])
def test_one_push_from_the_trainer_feeds_the_whole_chain(fanout: str) -> None:
    replicas = [Replica() for _ in range(3)]
    publisher = Publisher([r.address for r in replicas], "w", fanout=fanout)
    try:
        state = {k: v.clone() for k, v in fresh().state_dict().items()}
        publisher.publish("m", state)  # first contact: a full push to each
        for tensor in state.values():
            tensor += 1  # every tensor changes: each delta carries the whole state
        report = publisher.publish("m", state)
        assert report.targets == 3
        for replica in replicas:
            replica.assert_serves(state, 2)
        one_copy = sum(t.numel() * t.element_size() for t in state.values())
        copies = 1 if fanout == "chain" else 3
        # The payload (safetensors: tensor bytes and a small header) left the trainer once.
        assert copies * one_copy < report.payload_bytes < copies * (one_copy + 4096)
        versions = [t.version for t in publisher._targets.known()]
        assert versions == [2, 2, 2]
    finally:
        publisher.close()
        for replica in replicas:
            replica.stop()


def test_a_hop_fenced_down_the_chain_stops_the_trainer_as_a_direct_push_would() -> None:
    replicas = [Replica() for _ in range(3)]
    publisher = Publisher([r.address for r in replicas], "w")
    try:
        state = {k: v.clone() for k, v in fresh().state_dict().items()}
        publisher.publish("m", state)
        last = sorted(replicas, key=lambda r: r.address)[-1]  # the end of the chain
        last.model.lease.grant("another")
        state[next(iter(state))] += 1
        with pytest.raises(WriterFencedError, match="another trainer has taken it over"):
            publisher.publish("m", state)
        for replica in replicas:
            if replica is not last:
                replica.assert_serves(state, 2)  # the hops before it committed on their own
        assert last.model.live.version == 1
        with pytest.raises(WriterFencedError):
            publisher.publish("m", state)  # it stays stopped
    finally:
        publisher.close()
        for replica in replicas:
            replica.stop()


def test_a_hop_that_never_answers_is_asked_within_the_connect_timeout_not_the_watch() -> None:
    # A sync plane whose GetModel hangs (its transport answers pings, so the link's watch never
    # drops it): with a stall bound of 300 s the look would wait 150 s; it is bounded by the
    # connect timeout (0.5 s), and the hop lags.
    released = threading.Event()

    def hang(request: bytes, context: grpc.ServicerContext) -> bytes:
        released.wait(60)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "weightsync.v1.WeightSync", {"GetModel": grpc.unary_unary_rpc_method_handler(hang)}
    )
    server = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = SyncClient(f"127.0.0.1:{port}", 300.0, stall_timeout_s=300.0)
    hop = target(client)
    failed = PushFailedError(hop.address, grpc.StatusCode.UNAVAILABLE, "cannot dial", None)
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(chain.ask, hop, chain.Unreached(failed), 0.5)
        try:
            assert asked.result(timeout=30) == [(hop, failed)]
            assert hop.lagging_since is not None
        finally:
            released.set()
            client.close()
            server.stop(None)
