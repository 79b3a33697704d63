"""Routes a careless or hostile writer may send: a hop named twice, a replica routed to itself.
Each is refused up front with INVALID_ARGUMENT, before anything is dialled or swapped. And a hop
that takes connections but never speaks gRPC, and one that speaks it and never reads a push."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from shared import protocol
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import error_reason
from shared.weights.digest import state_digest
from tests.integration.conftest import Services
from tests.integration.stuck_plane import unread_sync_plane
from tests.integration.test_forwarding import STAMP, Sync, forwarded_to, stamp_state


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


@pytest.mark.parametrize("relay", ["on", "off"])
@pytest.mark.parametrize("where", ["next", "after-another"])
def test_a_route_back_to_the_replica_itself_is_refused_and_its_push_left_alone(
    services: Services, relay: str, where: str
) -> None:
    first = services.inference(STAMP, "--sync-relay", relay, name="first")
    hop = services.inference(STAMP, "--sync-relay", "off", name="hop")
    to_first, to_hop = Sync(first.sync), Sync(hop.sync)
    before = [to_first.state(), to_hop.state()]
    epoch = to_first.acquire("tester")
    # The replica under another name of its address: a route reaching it again.
    itself = pb.Hop(address=f"localhost:{first.sync.rsplit(':', 1)[1]}", writer_epoch=epoch)
    other = pb.Hop(address=hop.sync, writer_epoch=to_hop.acquire("tester"))
    route = [itself] if where == "next" else [other, itself]

    with pytest.raises(grpc.RpcError) as refused:
        to_first.push(stamp_state(3), 2, epoch, route)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(refused.value) == protocol.MALFORMED_PUSH
    assert f"names this replica itself ({itself.address!r})" in (refused.value.details() or "")
    assert forwarded_to(services, "first") == []
    for sync, was in zip((to_first, to_hop), before, strict=True):
        now = sync.state()
        assert (now.version, now.digest, now.pending.version) == (was.version, was.digest, 0)
    # The same push without the loop commits: nothing of the refused one stood in its way.
    to_first.push(stamp_state(3), 2, epoch, route[:-1])
    assert to_first.state().digest == state_digest(stamp_state(3))


@contextmanager
def silent_listener() -> Iterator[str]:
    """An address that accepts TCP connections and reads them, never answering: a peer that
    speaks no HTTP/2 (a wrong port, a stuck proxy)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def take() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            held.append(connection)
            threading.Thread(target=lambda c=connection: drain(c), daemon=True).start()

    def drain(connection: socket.socket) -> None:
        while True:
            try:
                if not connection.recv(1 << 16):
                    return
            except OSError:
                return

    threading.Thread(target=take, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for connection in held:
            connection.close()


@pytest.mark.parametrize("megabytes", [1, 16])  # within the hop's queue, and beyond it
def test_a_hop_that_never_speaks_grpc_is_reported_not_reached_and_routed_past(
    services: Services, megabytes: int
) -> None:
    """Whatever the push's size, it is reported as a hop not reached at all (UNAVAILABLE, no
    reason: the trainer asks it itself) once it has not connected for 2 s, and the hop after it
    commits; not after the answer's bound (10 s here), nor one way for a small push and
    another for a large one (found by an outside review)."""
    services.env["TEST_STAMP_MB"] = str(megabytes)
    first = services.inference(STAMP, name="first")
    after = services.inference(STAMP, name="after")
    to_first, to_after = Sync(first.sync), Sync(after.sync)
    epoch = to_first.acquire("tester")
    state = stamp_state(3, megabytes)
    with silent_listener() as silent:
        route = [
            pb.Hop(address=silent, writer_epoch=epoch),
            pb.Hop(address=after.sync, writer_epoch=to_after.acquire("tester")),
        ]
        response = to_first.push(state, 2, epoch, route)
    assert response.version == 2
    hops = {hop.address: hop for hop in response.hops}
    assert (hops[silent].code, hops[silent].reason) == (grpc.StatusCode.UNAVAILABLE.value[0], "")
    assert "not connected since it was dialled" in hops[silent].message
    assert hops[after.sync].version == 2
    assert to_after.state().digest == state_digest(state)


def test_a_hop_that_never_reads_a_small_push_is_cut_without_waiting_for_the_hops_after_it(
    services: Services,
) -> None:
    """A 1 MiB push leaves whole into the transport's buffers whether the hop reads it or not;
    the hop is found by what it says it applied (nothing, one --push-idle-timeout-s after it was
    first asked), not once its answer is late for every hop after it (10 s here), and the hop
    after it commits (found by an outside review)."""
    first = services.inference(STAMP, name="first")
    after = services.inference(STAMP, name="after")
    to_first, to_after = Sync(first.sync), Sync(after.sync)
    epoch = to_first.acquire("tester")
    state = stamp_state(3, 1)
    with unread_sync_plane() as stuck:
        route = [
            pb.Hop(address=stuck, writer_epoch=epoch),
            pb.Hop(address=after.sync, writer_epoch=to_after.acquire("tester")),
        ]
        response = to_first.push(state, 2, epoch, route)
    assert response.version == 2
    hops = {hop.address: hop for hop in response.hops}
    assert (hops[stuck].code, hops[stuck].reason) == (
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        protocol.PUSH_STALLED,
    )
    assert "applied nothing more of the push for 5s" in hops[stuck].message
    assert hops[after.sync].version == 2
    assert to_after.state().digest == state_digest(state)
