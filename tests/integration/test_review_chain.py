"""A review of forwarding from outside, with real processes over gRPC: routes whose hops each
fail their own way (another deployment's replica, a wrong token, a fenced epoch, nothing
listening) still commit on every good hop after them, each failing hop refusing exactly as a
direct push would; an older writer's push is refused on every hop it is routed to, a push
fenced on the replica it arrives at commits nowhere down its route, a hop taken over mid-push
refuses it while the hop after it commits; two trainers racing through one chain end with the
newer writer's weights everywhere."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from shared import protocol
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights.digest import state_digest
from tests.integration.conftest import Services, wait_until
from tests.integration.test_forwarding import (
    STAMP,
    Sync,
    free_ports,
    push_requests,
    refusal,
    served_version,
    stamp_state,
)

TOKEN = "chain-secret"


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


def unchanged(sync: Sync, was: pb.ModelState) -> None:
    """`sync`'s replica still serves what it served, and holds no push."""

    def settled() -> bool:
        return not sync.state().HasField("pending")

    wait_until(settled, timeout=30)  # a kept push is dropped at the end of its window
    now = sync.state()
    assert (now.version, now.digest) == (was.version, was.digest)


def code(status: grpc.StatusCode) -> int:
    return int(status.value[0])


def test_a_route_whose_hops_fail_each_their_own_way_commits_on_every_good_hop_after_them(
    services: Services,
) -> None:
    """Another deployment's replica (no such model), one with another token, one whose epoch is
    fenced and a port nothing listens on, interleaved with good hops: each refuses as a direct
    push would and is left as it was, each good hop commits the push bit-exact."""
    services.env["INFERENCE_SYNC_TOKEN"] = TOKEN
    first = services.inference(STAMP, name="first")
    good = [services.inference(STAMP, name=f"good{i}") for i in range(3)]
    services.env["TEST_STAMP_MB"] = "2"  # another layout of the model: another app's version
    layout = services.inference(STAMP, "--sync-relay", "off", name="layout")
    services.env["TEST_STAMP_MB"] = "1"
    services.env["INFERENCE_SYNC_TOKEN"] = "another-secret"
    stranger = services.inference(STAMP, "--sync-relay", "off", name="stranger")
    services.env["INFERENCE_SYNC_TOKEN"] = TOKEN
    fenced = services.inference(STAMP, "--sync-relay", "off", name="fenced")
    [closed] = free_ports(1)
    nobody = f"127.0.0.1:{closed}"

    to_first, to_good = Sync(first.sync, TOKEN), [Sync(g.sync, TOKEN) for g in good]
    to_layout, to_fenced = Sync(layout.sync, TOKEN), Sync(fenced.sync, TOKEN)
    to_stranger = Sync(stranger.sync, "another-secret")
    stale = to_fenced.acquire("tester")
    to_fenced.acquire("newer")  # fences `stale`
    epochs = [s.acquire("tester") for s in to_good]
    layout_epoch = to_layout.acquire("tester")
    stranger_epoch = to_stranger.acquire("tester")
    bad = [to_layout, to_stranger, to_fenced]
    before = [s.state() for s in bad]
    route = [
        pb.Hop(address=layout.sync, writer_epoch=layout_epoch),
        pb.Hop(address=good[0].sync, writer_epoch=epochs[0]),
        pb.Hop(address=stranger.sync, writer_epoch=stranger_epoch),
        pb.Hop(address=nobody, writer_epoch=1),
        pb.Hop(address=good[1].sync, writer_epoch=epochs[1]),
        pb.Hop(address=fenced.sync, writer_epoch=stale),
        pb.Hop(address=good[2].sync, writer_epoch=epochs[2]),
    ]

    response = to_first.push(stamp_state(5), 2, to_first.acquire("tester"), route)

    assert response.version == 2
    results = {h.address: h for h in response.hops}
    assert [h.address for h in response.hops] == [h.address for h in route]
    digest = state_digest(stamp_state(5))
    for sync, replica in zip(to_good, good, strict=True):
        assert results[replica.sync].version == 2, results[replica.sync]
        now = sync.state()
        assert (now.version, now.digest) == (2, digest)
        assert served_version(replica) == "2"
    # Each failing hop's result is what a direct push under the same epoch gets there.
    direct = {
        layout.sync: refusal(to_layout, stamp_state(5), 2, layout_epoch),
        stranger.sync: refusal(Sync(stranger.sync, TOKEN), stamp_state(5), 2, stranger_epoch),
        fenced.sync: refusal(to_fenced, stamp_state(5), 2, stale),
    }
    assert direct[layout.sync][0] == code(grpc.StatusCode.INVALID_ARGUMENT)
    assert direct[stranger.sync][0] == code(grpc.StatusCode.UNAUTHENTICATED)
    assert direct[fenced.sync][:2] == (code(grpc.StatusCode.ABORTED), protocol.FENCED)
    for address, refused in direct.items():
        result = results[address]
        assert (result.version, result.code, result.reason) == (0, *refused[:2]), result
    assert results[nobody].version == 0
    assert results[nobody].code == code(grpc.StatusCode.UNAVAILABLE)
    for sync, was in zip(bad, before, strict=True):
        unchanged(sync, was)


def test_an_older_writers_push_routed_past_fenced_hops_is_refused_on_every_one_of_them(
    services: Services,
) -> None:
    """Writer A still holds the first replica; B took the two hops over after A's grant there.
    A's push commits on the first only: each hop, the one routed past the other included,
    refuses it as fenced, as a direct push from A, and keeps what it served."""
    first = services.inference(STAMP, name="first")
    hops = [
        services.inference(STAMP, "--sync-relay", mode, name=f"hop{mode}") for mode in ("on", "off")
    ]
    to_first, to_hops = Sync(first.sync), [Sync(h.sync) for h in hops]
    old = [s.acquire("tester") for s in to_hops]
    for sync in to_hops:  # B takes each hop over and pushes its own version there
        assert sync.push(stamp_state(9), 5, sync.acquire("newer")).version == 5
    before = [s.state() for s in to_hops]
    route = [pb.Hop(address=h.sync, writer_epoch=e) for h, e in zip(hops, old, strict=True)]

    response = to_first.push(stamp_state(6), 6, to_first.acquire("tester"), route)

    assert response.version == 6
    assert [h.address for h in response.hops] == [h.sync for h in hops]
    for result, sync, epoch in zip(response.hops, to_hops, old, strict=True):
        direct = refusal(sync, stamp_state(6), 6, epoch)
        assert direct[:2] == (code(grpc.StatusCode.ABORTED), protocol.FENCED)
        assert (result.version, result.code, result.reason) == (0, *direct[:2]), result
    for sync, was in zip(to_hops, before, strict=True):
        unchanged(sync, was)


def slow_push(
    state: dict[str, torch.Tensor], version: int, epoch: int, route: list[pb.Hop], pause: float
) -> Iterator[pb.PushRequest]:
    """A push's messages, each data chunk after `pause` seconds: a writer streaming slowly."""
    for message in push_requests(state, version, epoch, route):
        if message.HasField("data"):
            time.sleep(pause)
        yield message


def test_a_push_fenced_on_the_replica_it_arrives_at_commits_nowhere_down_its_route(
    services: Services,
) -> None:
    """Writer A streams a push through the first replica to two hops where A's lease is still
    good; B takes the first replica over mid-stream. A's push ends fenced, and no hop commits
    what A sent through the fenced replica, relay or not."""
    services.env["TEST_STAMP_MB"] = "4"
    first = services.inference(STAMP, name="first")
    hops = [
        services.inference(STAMP, "--sync-relay", mode, name=f"hop{mode}") for mode in ("on", "off")
    ]
    to_first, to_hops = Sync(first.sync), [Sync(h.sync) for h in hops]
    route = [
        pb.Hop(address=h.sync, writer_epoch=s.acquire("tester"))
        for h, s in zip(hops, to_hops, strict=True)
    ]
    before = [s.state() for s in (to_first, *to_hops)]
    epoch = to_first.acquire("tester")
    messages = slow_push(stamp_state(3, mb=4), 2, epoch, route, pause=0.5)
    call = to_first.stub().Push.future(messages, timeout=60)

    def passed_on() -> bool:
        return all(s.state().pending.bytes_received > 0 for s in to_hops)

    wait_until(passed_on, timeout=30)
    to_first.acquire("newer")  # B takes the first replica over
    with pytest.raises(grpc.RpcError) as refused:
        call.result(timeout=60)
    assert refused.value.code() == grpc.StatusCode.ABORTED, refused.value.details()
    for sync, was in zip((to_first, *to_hops), before, strict=True):
        unchanged(sync, was)


def test_a_hop_taken_over_mid_push_refuses_it_as_fenced_and_the_hop_after_it_still_commits(
    services: Services,
) -> None:
    """Writer A streams a push through the first replica to two hops; B takes the first hop
    over while A's bytes flow into it. That hop ends A's forwarded push fenced and keeps what
    it served; the first and the hop after it, where A's lease still holds, commit it."""
    services.env["TEST_STAMP_MB"] = "4"
    first = services.inference(STAMP, name="first")
    taken = services.inference(STAMP, "--sync-relay", "off", name="taken")
    last = services.inference(STAMP, name="last")
    to_first, to_taken, to_last = Sync(first.sync), Sync(taken.sync), Sync(last.sync)
    route = [
        pb.Hop(address=taken.sync, writer_epoch=to_taken.acquire("tester")),
        pb.Hop(address=last.sync, writer_epoch=to_last.acquire("tester")),
    ]
    before = to_taken.state()
    state = stamp_state(3, mb=4)
    messages = slow_push(state, 2, to_first.acquire("tester"), route, pause=0.5)
    call = to_first.stub().Push.future(messages, timeout=60)
    wait_until(lambda: to_taken.state().pending.bytes_received > 0, timeout=30)
    to_taken.acquire("newer")

    response = call.result(timeout=60)

    assert response.version == 2
    [fenced, committed] = response.hops
    assert (fenced.address, fenced.version) == (taken.sync, 0)
    assert (fenced.code, fenced.reason) == (code(grpc.StatusCode.ABORTED), protocol.FENCED)
    assert (committed.address, committed.version) == (last.sync, 2)
    for sync in (to_first, to_last):
        now = sync.state()
        assert (now.version, now.digest) == (2, state_digest(state))
    unchanged(to_taken, before)


def test_two_trainers_racing_through_one_chain_end_with_the_newer_writers_weights_everywhere(
    services: Services,
) -> None:
    """Trainer A keeps pushing down a chain of three replicas; trainer B starts on the same
    replicas. A is fenced and exits 3; once B is done every replica serves B's last version,
    bit-exact, written by B."""
    services.env["TEST_STAMP_MB"] = "2"
    ports = free_ports(3)
    replicas = [
        services.inference(STAMP, "--sync-listen", f"127.0.0.1:{port}", name=f"replica{i}")
        for i, port in enumerate(ports)
    ]
    older = services.trainer(STAMP, replicas, "--run-interval", "0.1", name="older")
    wait_until(lambda: all(r.model_state("stamp").version >= 4 for r in replicas), timeout=60)
    newer = services.trainer(STAMP, replicas, "--max-runs", "3", name="newer")
    assert newer.wait(timeout=120) == 0, services.log("newer")
    assert older.wait(timeout=60) == 3, services.log("older")
    states = [r.model_state("stamp") for r in replicas]
    assert len({(s.version, s.digest, s.writer_id) for s in states}) == 1, states
    assert (states[0].digest, states[0].writer_id) == (state_digest(stamp_state(3, mb=2)), "newer")
    for replica in replicas:
        assert served_version(replica) == str(states[0].version)
