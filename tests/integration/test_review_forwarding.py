"""Routes a careless or hostile writer may send: a hop named twice, a replica routed to itself.
Each is refused up front with INVALID_ARGUMENT, before anything is dialled or swapped."""

from __future__ import annotations

import grpc
import pytest

from shared import protocol
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import error_reason
from shared.weights.digest import state_digest
from tests.integration.conftest import Services
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
