"""The forwarder on its own: routes checked, a hop that cannot be reached or stalls reported
with its status while the local push goes on, routes and hop results carried by both
transports' encodings."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from devtools.ports import free_port
from inference_service.syncplane import forward, messages
from inference_service.syncplane.forward import Forward, PeerAccess
from inference_service.syncplane.parts import Commit, Data, Hop, HopResult, PushHeader, PushOutcome
from inference_service.syncplane.relay.frames import (
    decode_answer,
    decode_header,
    encode_answer,
    encode_header,
)
from shared import protocol
from shared.errors import MalformedPushError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.integration.stuck_plane import serving_sync_plane

ROUTE = (Hop("replica2:9001", "replica2", 4), Hop("[::1]:9001", "", 9))
HEADER = PushHeader("m", 3, 2, "trainer-1", 4096, 5, ROUTE)


@pytest.fixture
def silent() -> Iterator[str]:
    """An address that takes TCP connections and never answers (a hop that hangs)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def closed_port() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens on it


def body(chunks: int, size: int = 1024) -> list[Data | Commit]:
    return [*(bytes([i]) * size for i in range(chunks)), Commit(b"d" * 16)]


def passed_on(route: tuple[Hop, ...], access: PeerAccess) -> tuple[HopResult, ...]:
    """A 4 KiB push passed on down `route` (the local push seeing every part, in order): what
    became of it on each hop."""
    onward = Forward(PushHeader("m", 3, 2, "t", 4096, 5, route), access)
    parts = body(4)
    assert list(onward.passing_on(parts)) == parts
    return onward.results()


def test_a_route_names_a_bounded_number_of_hops_each_with_an_address() -> None:
    forward.check_route(HEADER)
    too_long = PushHeader("m", 3, 2, "t", 1, 5, (Hop("a:1"),) * (forward.MAX_HOPS + 1))
    with pytest.raises(MalformedPushError, match="route names 257 hops; at most 256"):
        forward.check_route(too_long)
    with pytest.raises(MalformedPushError, match="has no address"):
        forward.check_route(PushHeader("m", 3, 2, "t", 1, 5, (Hop(""),)))
    assert forward.start(PushHeader("m", 3, 2, "t", 1, 5), PeerAccess()) is None


def test_a_hop_that_cannot_be_reached_is_reported_and_the_local_push_goes_on() -> None:
    address = closed_port()
    onward = Forward(PushHeader("m", 3, 2, "t", 4096, 5, (Hop(address, "", 1),)), PeerAccess())
    parts = body(4)
    assert list(onward.passing_on(parts)) == parts  # the local push sees every part, in order
    [result] = onward.results()
    assert (result.address, result.version) == (address, 0)
    assert result.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert not result.committed


def test_a_hop_that_never_connects_is_reported_not_reached_once_its_queue_is_full(
    silent: str,
) -> None:
    """A peer that takes TCP connections and never speaks HTTP/2 took nothing because it was
    never reached: reported as such (UNAVAILABLE, no reason: the trainer asks it itself), by
    the stall bound where its queue fills first."""
    header = PushHeader("m", 3, 2, "t", 64 << 10, 5, (Hop(silent, "", 1),))
    onward = Forward(header, PeerAccess(stall_timeout_s=0.3))
    parts = body(64)  # more than the queue holds
    assert list(onward.passing_on(parts)) == parts
    [result] = onward.results()
    assert (result.code, result.reason) == (grpc.StatusCode.UNAVAILABLE.value[0], "")
    assert result.message == "not connected since it was dialled"


@contextmanager
def serving_push(
    push: Callable[[Iterator[bytes], grpc.ServicerContext], Any],
    serializer: Callable[[Any], bytes] | None = None,
    get_model: Callable[[pb.GetModelRequest, grpc.ServicerContext], pb.ModelState] | None = None,
) -> Iterator[str]:
    """A sync plane (a real gRPC server) whose Push is `push` (and GetModel `get_model`, if
    given); its address."""
    handlers = {"Push": grpc.stream_unary_rpc_method_handler(push, response_serializer=serializer)}
    if get_model is not None:
        handlers["GetModel"] = grpc.unary_unary_rpc_method_handler(
            get_model,
            request_deserializer=pb.GetModelRequest.FromString,
            response_serializer=pb.ModelState.SerializeToString,
        )
    with serving_sync_plane(handlers) as address:
        yield address


@pytest.fixture
def unread() -> Iterator[str]:
    """A sync plane whose pushes are never read: a hop connected and stuck."""
    stuck = threading.Event()

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        stuck.wait(30)
        return b""

    with serving_push(push) as address:
        try:
            yield address
        finally:
            stuck.set()  # before the server stops: its handler's thread ends


def test_a_hop_that_takes_nothing_is_cut_off_after_the_bound(unread: str) -> None:
    header = PushHeader("m", 3, 2, "t", 16 << 20, 5, (Hop(unread, "", 1),))
    onward = Forward(header, PeerAccess(stall_timeout_s=0.3))
    parts = body(64, 256 << 10)  # more than the queue and the transport's window hold
    assert list(onward.passing_on(parts)) == parts
    [result] = onward.results()
    assert (result.code, result.reason) == (
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        "push-stalled",
    )
    assert result.message == "the hop took nothing for 0.3s; it was cut off"


@contextmanager
def stuck_hop(state: pb.ModelState | None) -> Iterator[str]:
    """A sync plane that reads no push, whose GetModel answers `state` (None: never answers
    at all, its handlers stuck as well)."""
    stuck = threading.Event()

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        stuck.wait(30)
        return b""

    def get_model(request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelState:
        if state is None:
            stuck.wait(30)
        return state or pb.ModelState()

    with serving_push(push, get_model=get_model) as address:
        try:
            yield address
        finally:
            stuck.set()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (pb.ModelState(model_name="m", version=2), "applied nothing more of the push for 1s"),
        (None, "did not say what it applied of the push (Deadline Exceeded)"),
    ],
    ids=["applies-nothing", "answers-nothing"],
)
def test_a_hop_stuck_on_a_push_its_buffers_take_whole_is_cut_without_waiting_for_its_hops(
    state: pb.ModelState | None, message: str
) -> None:
    """A push small enough for the queue and the transport's buffers leaves whole at once; a
    hop that never reads it is found by what it says it applied, not after the answer bound of
    every hop after it, and the hop after it is gone on with."""
    after = closed_port()
    with stuck_hop(state) as hop:
        route = (Hop(hop, "", 1), Hop(after, "", 1), Hop("next:9001", "", 1))
        stalled, unreached, last = passed_on(
            route, PeerAccess(stall_timeout_s=0.3, answer_timeout_s=1.0)
        )
    assert (stalled.address, stalled.code, stalled.reason) == (
        hop,
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        "push-stalled",
    )
    assert stalled.message == f"the hop {message}; it was cut off"
    assert (unreached.address, unreached.code) == (after, grpc.StatusCode.UNAVAILABLE.value[0])
    assert (last.address, last.code) == ("next:9001", grpc.StatusCode.UNAVAILABLE.value[0])


def test_a_hop_that_took_the_push_whole_is_waited_for_until_the_answer_bound() -> None:
    """A hop that applied the whole push is committing or waiting for the hops after it
    (bounded by its own watch of them): it is not cut before its answer is due."""

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushResponse:
        for _ in requests:
            pass
        threading.Event().wait(1.8)  # past the stall bound and one answer bound after it
        return pb.PushResponse(model_name="m", version=3)

    def get_model(request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelState:
        pending = pb.PendingPush(
            writer_id="t", version=3, base_version=2, bytes_received=4096, payload_bytes=4096
        )
        return pb.ModelState(model_name="m", version=2, pending=pending)

    with serving_push(push, pb.PushResponse.SerializeToString, get_model) as hop:
        route = (Hop(hop, "", 1), Hop("next:9001", "", 1), Hop("later:9001", "", 1))
        assert passed_on(route, PeerAccess(stall_timeout_s=0.3, answer_timeout_s=1.0)) == (
            HopResult(hop, 3),
        )


def test_the_route_and_the_hop_results_cross_both_transports() -> None:
    # gRPC: the header a forward sends is the header the next hop decodes, one hop shorter.
    decoded = messages.decode(messages.encode_header(HEADER))
    assert decoded == HEADER
    # The relay's push link: header and answer frames carry them as they are.
    assert decode_header(encode_header(HEADER)) == HEADER
    hops = (
        HopResult("replica2:9001", 3),
        HopResult("[::1]:9001", 0, grpc.StatusCode.ABORTED.value[0], "fenced", "écrit par b"),
    )
    outcome = PushOutcome("m", 3, bytes(range(16)), 4096, hops)
    assert decode_answer(*encode_answer(outcome)) == outcome
    response = messages.push_response(outcome)
    assert (
        tuple(HopResult(h.address, h.version, h.code, h.reason, h.message) for h in response.hops)
        == hops
    )


@pytest.fixture
def lying_hop() -> Iterator[str]:
    """A sync plane (a real gRPC server) that takes a push whole and claims, besides its own
    commit, results for addresses off its route, for its route's hops twice, and many more."""

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushResponse:
        for _ in requests:
            pass
        spoofed = [pb.HopResult(address="elsewhere:1", version=3)]
        spoofed += [pb.HopResult(address="next:9001", version=3)]
        spoofed += [pb.HopResult(address="next:9001", version=0, code=10, reason="fenced")]
        spoofed += [pb.HopResult(address=f"made-up-{i}:1", version=3) for i in range(10_000)]
        return pb.PushResponse(model_name="m", version=3, hops=spoofed)

    with serving_push(push, pb.PushResponse.SerializeToString) as address:
        yield address


def test_a_hop_speaks_only_for_the_hops_on_its_route_each_once(lying_hop: str) -> None:
    route = (Hop(lying_hop, "", 1), Hop("next:9001", "", 2))
    assert passed_on(route, PeerAccess()) == (HopResult(lying_hop, 3), HopResult("next:9001", 3))


def test_a_hop_that_goes_on_applying_a_push_slowly_is_waited_for_past_the_answer_bound() -> None:
    """A hop held to a rate limit applies the push after the commit left this replica: it is
    watched, not cut by the answer bound, while what it applied grows (found by an outside
    review: a hop at --sync-max-mb-per-s 0.5 was cut at 5 s and never got a version)."""
    read = [0]

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushResponse:
        for message in requests:
            threading.Event().wait(0.4)  # past the stall bound, each message
            read[0] += len(message)
        return pb.PushResponse(model_name="m", version=3)

    def get_model(request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelState:
        pending = pb.PendingPush(
            writer_id="t", version=3, base_version=2, bytes_received=read[0], payload_bytes=4096
        )
        return pb.ModelState(model_name="m", version=2, pending=pending)

    with serving_push(push, pb.PushResponse.SerializeToString, get_model) as hop:
        access = PeerAccess(stall_timeout_s=0.3, answer_timeout_s=0.5)
        # about 2 s: four times the bound
        assert passed_on((Hop(hop, "", 1),), access) == (HopResult(hop, 3),)


def test_a_hop_whose_look_is_refused_for_its_call_limit_is_asked_again_not_cut() -> None:
    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushResponse:
        for _ in requests:
            pass
        threading.Event().wait(1.2)
        return pb.PushResponse(model_name="m", version=3)

    def get_model(request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelState:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "at its limit of lookups; retry later")
        raise AssertionError("unreachable")

    with serving_push(push, pb.PushResponse.SerializeToString, get_model) as hop:
        route = (Hop(hop, "", 1), Hop("next:9001", "", 1), Hop("later:9001", "", 1))
        assert passed_on(route, PeerAccess(stall_timeout_s=0.3, answer_timeout_s=1.0)) == (
            HopResult(hop, 3),
        )


def test_a_look_at_another_model_says_nothing_of_this_push() -> None:
    pending = pb.PendingPush(
        writer_id="t", version=3, base_version=2, bytes_received=100, payload_bytes=4096
    )
    ours = pb.ModelState(model_name="m", pending=pending)
    assert protocol.bytes_applied(ours, "m", 3, 2, "t", 4096) == 100
    other = pb.ModelState(model_name="other", pending=pending)
    assert protocol.bytes_applied(other, "m", 3, 2, "t", 4096) == 0


def test_what_a_hop_says_goes_upstream_cut_to_the_status_message_bound() -> None:
    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushResponse:
        for _ in requests:
            pass
        lie = pb.HopResult(address="next:9001", code=9, reason="r" * 100_000, message="m" * 10**6)
        return pb.PushResponse(model_name="m", version=3, hops=[lie])

    with serving_push(push, pb.PushResponse.SerializeToString) as hop:
        route = (Hop(hop, "", 1), Hop("next:9001", "", 1))
        mine, lie = passed_on(route, PeerAccess())
    assert mine == HopResult(hop, 3)
    assert len(lie.message.encode()) <= 2048 and lie.message.endswith("bytes cut)")
    assert len(lie.reason.encode()) <= 128
