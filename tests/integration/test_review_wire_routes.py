"""Outside review of the sync wire: resumed pushes, fencing, routes and seeds built from the docs
(review_wire.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.integration.conftest import wait_until
from tests.integration.review_wire import (
    INVALID,
    PRECONDITION,
    Lab,
    Model,
    bf16_state,
    changed,
    digest,
    opened_lab,
    port,
    whole,
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with opened_lab(tmp_path_factory) as lab:
        yield lab


def broken(m: Model, blob: bytes, dig: bytes, upto: int) -> pb.PushHeader:
    """A push that sent `upto` payload bytes, then was cancelled; returns its header."""
    msgs = m.messages(blob, dig)
    gate = threading.Event()

    def stream() -> Iterator[bytes]:
        yield msgs[0].SerializeToString()
        yield pb.PushRequest(data=blob[:upto]).SerializeToString()
        gate.wait(20)

    future = m.push_call.future(stream(), timeout=30)
    wait_until(lambda: m.served().pending.bytes_received >= upto, timeout=10)
    future.cancel()
    gate.set()
    wait_until(lambda: m.served().pending.bytes_received == upto, timeout=10)
    return msgs[0].header


def resume(m: Model, head: pb.PushHeader, blob: bytes, offset: int, dig: bytes, **fields) -> None:
    h = pb.PushHeader()
    h.CopyFrom(head)
    h.resume_from = offset
    for key, value in fields.items():
        setattr(h, key, value)
    msgs = [
        pb.PushRequest(header=h),
        pb.PushRequest(data=blob[min(offset, len(blob)) :]),
        pb.PushRequest(commit=pb.PushCommit(digest=dig)),
    ]
    m.push_call(iter([x.SerializeToString() for x in msgs]), timeout=30)


def test_resumes_that_name_another_push_or_an_offset_past_it_apply_nothing(lab: Lab) -> None:
    m = lab.wide
    new = bf16_state(31, m.state)
    blob = whole(new)
    head = broken(m, blob, digest(new), 60_000)
    bad = {
        "an offset one past the bytes applied": dict(offset=60_001),
        "an offset past the payload": dict(offset=len(blob) + 10),
        "another payload size": dict(offset=60_000, payload_bytes=len(blob) + 2),
        "another writer": dict(offset=60_000, writer_id="someone"),
        "another version": dict(offset=60_000, version=head.version + 1),
        "another base": dict(offset=60_000, base_version=head.version - 1),
    }
    for what, fields in bad.items():
        offset = fields.pop("offset")
        send = lambda o=offset, f=fields: resume(m, head, blob, o, digest(new), **f)  # noqa: E731
        m.refused(send, PRECONDITION, reason="resume-mismatch", what=what)
        assert m.served().pending.bytes_received == 60_000, what  # the kept push stays
    m.refused(lambda: resume(m, head, blob, 1 << 63, digest(new)), INVALID, "resume_from")
    # a resume from 1 with other bytes: the bytes held are kept, so its digest cannot match
    other = bf16_state(32, m.state)
    m.refused(lambda: resume(m, head, whole(other), 1, digest(other)), INVALID, "digest")
    # and a push cancelled again, resumed exactly, commits the state it meant to
    head = broken(m, blob, digest(new), 70_000)
    resume(m, head, blob, 50_000, digest(new))  # a slightly stale offset is fine
    assert m.served().digest == digest(new)
    m.state = new
    # a resume under an epoch fenced since is refused as any push is
    head = broken(m, whole(other), digest(other), 40_000)
    m.lease("took-over")
    send = lambda: resume(m, head, whole(other), 40_000, digest(other))  # noqa: E731
    m.refused(send, grpc.StatusCode.ABORTED, reason="fenced")


def test_a_writer_fenced_mid_push_commits_nothing_and_the_new_writer_does(lab: Lab) -> None:
    m = lab.wide
    old_state, new_state = bf16_state(41, m.state), bf16_state(42, m.state)
    msgs = m.messages(whole(old_state), digest(old_state))
    gate = threading.Event()

    def stream() -> Iterator[bytes]:
        yield msgs[0].SerializeToString()
        yield pb.PushRequest(data=msgs[1].data[:50_000]).SerializeToString()
        gate.wait(20)
        yield pb.PushRequest(data=msgs[1].data[50_000:]).SerializeToString()
        yield msgs[-1].SerializeToString()

    before = m.served()
    future = m.push_call.future(stream(), timeout=30)
    wait_until(lambda: m.served().pending.bytes_received >= 50_000, timeout=10)
    m.lease("second-writer")
    gate.set()
    with pytest.raises(grpc.RpcError) as caught:
        future.result()
    assert caught.value.code() == grpc.StatusCode.ABORTED, caught.value.details()
    assert dict(caught.value.trailing_metadata() or ()).get("error-reason") == "fenced"
    m.unchanged(before)
    m.commit_full(new_state)
    assert m.served().writer_id == "second-writer"


def self_spellings(m: Model) -> list[str]:
    p = port(m)
    # fmt: off
    return [f"127.0.0.1:{p}", f"localhost:{p}", f"127.0.0.1:0{p}", f"[::ffff:127.0.0.1]:{p}",
            f"127.1:{p}", f"127.0.0.1:{p + 65536}", f"0.0.0.0:{p}"]  # 0.0.0.0 dials this host
    # fmt: on


def test_routes_that_loop_back_or_are_not_host_port_are_refused(lab: Lab) -> None:
    m = lab.wide
    new = changed(m.state, 51)
    blob, dig = whole(new), digest(new)
    spelled = [f"127.0.0.1:{p}" for p in range(20000, 20257)]
    second = lab.second  # a loop through another replica back to this one
    # fmt: off
    routes = [([a], a) for a in self_spellings(m)] + [
        (["127.0.0.1:0"], "127.0.0.1:0"), (["127.0.0.1"], "127.0.0.1"), ([""], "address"),
        (["unix:/tmp/x.sock"], "unix:/tmp/x.sock"), ([f"ipv4:127.0.0.1:{port(m)}"], "ipv4:"),
        ([f"dns:///127.0.0.1:{port(m)}"], "dns:"), (["127.0.0.1:1", "localhost:1"], "localhost:1"),
        (spelled, "256"), ([second.inf.sync, f"localhost:{port(m)}"], f"localhost:{port(m)}"),
        ([second.inf.sync, f"0.0.0.0:{port(m)}"], f"0.0.0.0:{port(m)}"),
    ]
    # fmt: on
    for route, fragment in routes:
        before = second.served()
        hops = [pb.Hop(address=a, writer_epoch=m.epoch) for a in route]
        if route[0] == second.inf.sync:
            hops[0].writer_epoch = second.epoch
        send = lambda h=hops: m.push(blob, dig, route=h)  # noqa: E731
        m.refused(send, INVALID, fragment, reason="malformed-push", what=route[:2])
        second.unchanged(before)


def test_a_hop_that_cannot_be_reached_is_reported_and_the_push_commits(lab: Lab) -> None:
    m = lab.wide
    new = changed(m.state, 52)
    started = time.monotonic()
    answer = m.push(whole(new), digest(new), route=[pb.Hop(address="127.0.0.1:1")])
    assert time.monotonic() - started < 10
    assert m.served().digest == digest(new)
    m.state = new
    assert [h.address for h in answer.hops] == ["127.0.0.1:1"]
    unreachable = {grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
    assert answer.hops[0].version == 0 and answer.hops[0].code in unreachable, answer.hops


def test_seeds_to_itself_or_to_bad_addresses_are_refused(lab: Lab) -> None:
    m = lab.wide
    stub = m.inf.sync_stub()
    version = m.served().version

    def seed(address: str, v: int = version, model: str = "wide") -> pb.HopResult:
        request = pb.SeedRequest(
            model_name=model, version=v, hop=pb.Hop(address=address, writer_epoch=m.epoch)
        )
        return stub.Seed(request, timeout=20)

    for address in [*self_spellings(m), "127.0.0.1:0", "nope", "", "unix:/tmp/x.sock"]:
        m.refused(lambda a=address: seed(a), INVALID, address[:40], what=address)
    m.refused(lambda: seed("127.0.0.1:1", 0), INVALID)  # no version expected
    m.refused(
        lambda: seed("127.0.0.1:1", version + 1), PRECONDITION, reason="seed-version-mismatch"
    )
    m.refused(lambda: seed("127.0.0.1:1", model="nope"), grpc.StatusCode.NOT_FOUND, "nope")
    started = time.monotonic()
    result = seed("127.0.0.1:1")
    assert time.monotonic() - started < 15
    assert result.version == 0 and result.code == grpc.StatusCode.UNAVAILABLE.value[0], result
    result = seed(m.inf.data)  # a data plane: no WeightSync there
    assert result.code == grpc.StatusCode.UNIMPLEMENTED.value[0], result
    assert "WeightSync" in result.message
    # a hop under an epoch it never granted refuses, and changes nothing; its own commits
    hop = lab.second
    before = hop.served()
    request = pb.SeedRequest(model_name="wide", version=version, hop=pb.Hop(address=hop.inf.sync))
    request.hop.writer_epoch = hop.epoch + 5
    result = stub.Seed(request, timeout=20)
    assert result.version == 0 and result.reason == "unknown-epoch", result
    hop.unchanged(before)
    request.hop.writer_epoch = hop.epoch
    assert stub.Seed(request, timeout=20).version == version
    assert hop.served().digest == m.served().digest
