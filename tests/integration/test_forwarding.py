"""Chain forwarding: one push from the trainer feeds several replicas, each passing it on to the
next as it arrives; every hop checks and commits on its own and refuses a forwarded push
exactly where it would refuse a direct one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import tritonclient.grpc as triton

from devtools.ports import free_ports as loopback_ports
from shared import protocol
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.grpc.errors import error_reason
from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.apps import Stamp
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.pki import SERVER_NAME, make_ca, make_cert

STAMP = "tests.integration.apps:stamp"
TOKEN = "sync-secret"


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


def stamp_state(run: int, mb: int = 1) -> dict[str, torch.Tensor]:
    """The stamp model's state after trainer run `run` (0: as initialised)."""
    module = Stamp(mb)
    with torch.no_grad():
        for part in module.parts:
            part.fill_(float(run))
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def free_ports(count: int) -> list[int]:
    """Free loopback ports, in the order the trainer chains their addresses."""
    return sorted(loopback_ports(count), key=lambda port: f"127.0.0.1:{port}")


def served_version(inference: Inference) -> str:
    """The version the data plane names in its response to an inference request."""
    client = triton.InferenceServerClient(url=inference.data)
    tensor = triton.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(torch.zeros(1, 8).numpy())
    version: str = client.infer("stamp", [tensor], client_timeout=10).get_response().model_version
    return version


def forwarded_to(services: Services, name: str) -> list[str]:
    """The addresses the replica `name` passed pushes on to, as its log says."""
    marker = "passing the push on to "
    return [
        line.split(marker, 1)[1].split(" ", 1)[0]
        for line in services.log(name).splitlines()
        if marker in line and "more hop(s) after it" in line
    ]


class Sync:
    """Raw sync-plane calls to one replica, as a trainer makes them."""

    def __init__(self, address: str, token: str | None = None, pki: Path | None = None) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.pki = pki

    def stub(self, server_name: str = SERVER_NAME) -> pb_grpc.WeightSyncStub:
        if self.pki is None:
            channel = grpc.insecure_channel(self.address)
        else:
            credentials = grpc.ssl_channel_credentials((self.pki / "ca.pem").read_bytes())
            options = [("grpc.ssl_target_name_override", server_name)]
            channel = grpc.secure_channel(self.address, credentials, options=options)
        return pb_grpc.WeightSyncStub(channel)

    def acquire(self, writer: str) -> int:
        request = pb.AcquireWriterRequest(model_name="stamp", writer_id=writer)
        return int(self.stub().AcquireWriter(request, timeout=10, metadata=self.metadata).epoch)

    def state(self) -> pb.ModelState:
        request = pb.GetModelRequest(model_name="stamp")
        state: pb.ModelState = self.stub().GetModel(request, timeout=10, metadata=self.metadata)
        return state

    def push(
        self,
        state: dict[str, torch.Tensor],
        version: int,
        epoch: int,
        route: list[pb.Hop] | None = None,
        server_name: str = SERVER_NAME,
    ) -> pb.PushResponse:
        """A full push of `state` as `version` under `epoch`, passed on down `route`."""
        messages = push_requests(state, version, epoch, route)
        push = self.stub(server_name).Push
        response: pb.PushResponse = push(messages, timeout=30, metadata=self.metadata)
        return response


def push_requests(
    state: dict[str, torch.Tensor], version: int, epoch: int, route: list[pb.Hop] | None = None
) -> Iterator[pb.PushRequest]:
    """The messages of a full push of the stamp model's `state` by the writer `tester`: its
    header, its payload in 1 MiB chunks, its commit."""
    payload = Payload.of(list(state.items()))
    header = pb.PushHeader(
        model_name="stamp",
        version=version,
        writer_id="tester",
        payload_bytes=payload.nbytes,
        writer_epoch=epoch,
        route=route or [],
    )
    yield pb.PushRequest(header=header)
    for pieces in payload.pieces(1 << 20, None):
        yield pb.PushRequest(data=b"".join(bytes(p) for p in pieces))
    yield pb.PushRequest(commit=pb.PushCommit(digest=state_digest(state)))


def refusal(call: Sync, *args: object, **kwargs: object) -> tuple[int, str, str]:
    """The status code number, error-reason and message a direct push is refused with."""
    with pytest.raises(grpc.RpcError) as refused:
        call.push(*args, **kwargs)  # type: ignore[arg-type]
    error = refused.value
    return error.code().value[0], error_reason(error) or "", error.details() or ""


def test_three_replicas_fed_through_one_chain_serve_the_version_bit_exact(
    services: Services,
) -> None:
    ports = free_ports(3)
    replicas = [
        services.inference(STAMP, "--sync-listen", f"127.0.0.1:{port}", name=f"replica{i}")
        for i, port in enumerate(ports)
    ]
    trainer = services.trainer(STAMP, replicas, "--max-runs", "2")
    assert trainer.wait(timeout=60) == 0, services.log("trainer")
    digest = state_digest(stamp_state(2))
    for replica in replicas:
        state = replica.model_state("stamp")
        assert (state.version, state.digest) == (3, digest)
        assert served_version(replica) == "3"
    # Versions 2 and 3 went down the chain in address order: one push from the trainer each.
    assert forwarded_to(services, "replica0") == [replicas[1].sync] * 2
    assert forwarded_to(services, "replica1") == [replicas[2].sync] * 2
    assert forwarded_to(services, "replica2") == []
    assert "version 3 committed on 3 inference service(s)" in services.log("trainer")


def test_a_middle_replica_killed_mid_push_is_routed_past_and_caught_up_after_restart(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "2"
    ports = free_ports(3)
    first = services.inference(STAMP, "--sync-listen", f"127.0.0.1:{ports[0]}", name="first")
    # The middle one takes pushes at 1 MB/s (and in-process): a push to it lasts ~2 s.
    middle = services.inference(
        STAMP,
        "--sync-listen",
        f"127.0.0.1:{ports[1]}",
        "--sync-max-mb-per-s",
        "1",
        "--sync-relay",
        "off",
        name="middle",
    )
    last = services.inference(STAMP, "--sync-listen", f"127.0.0.1:{ports[2]}", name="last")
    # One run after the first sync, then a long wait: only the catch-up can feed the middle.
    trainer = services.trainer(
        STAMP,
        [first, middle, last],
        "--max-runs",
        "2",
        "--run-interval",
        "600",
        "--connect-timeout",
        "1",
    )

    # Version 2 is the first to go down the chain: kill the middle while its bytes flow in,
    # once it has passed some on to the last.
    def receiving_version_2(replica: Inference) -> bool:
        pending = replica.model_state("stamp").pending
        return pending.version == 2 and pending.bytes_received > 0

    wait_until(lambda: receiving_version_2(middle) and receiving_version_2(last), timeout=60)
    middle.process.kill()
    middle.process.wait(timeout=10)
    wait_until(lambda: "version 2 committed on 2" in services.log("trainer"), timeout=30)
    digest = state_digest(stamp_state(1, mb=2))
    for replica in (first, last):
        state = replica.model_state("stamp")
        assert (state.version, state.digest) == (2, digest)
    assert forwarded_to(services, "first") == [middle.sync]
    assert f"lagging: {middle.sync}" in services.log("trainer")
    # The first went on with the last itself, from the bytes the last held: the trainer did not
    # push it again (its one commit of version 2 is the resumed push).
    routed = f"routing past {middle.sync}: resuming the push on {last.sync} from byte "
    assert routed in services.log("first")
    [committed] = [
        line for line in services.log("last").splitlines() if "committed version 2" in line
    ]
    assert "resumed from byte " in committed

    back = services.inference(STAMP, "--sync-listen", middle.sync, name="back")
    wait_until(lambda: back.model_state("stamp").version == 2, timeout=30)
    assert back.model_state("stamp").digest == digest
    wait_until(lambda: f"{middle.sync} caught up" in services.log("trainer"), timeout=10)
    assert trainer.poll() is None  # still waiting out its run interval: no sync did this


def test_a_hop_refuses_a_forwarded_push_with_another_token_as_it_would_a_direct_one(
    services: Services,
) -> None:
    services.env["INFERENCE_SYNC_TOKEN"] = TOKEN
    first = services.inference(STAMP, name="first")
    services.env["INFERENCE_SYNC_TOKEN"] = "another-secret"
    hop = services.inference(STAMP, "--sync-relay", "off", name="hop")
    to_first, to_hop = Sync(first.sync, TOKEN), Sync(hop.sync, "another-secret")
    before = to_hop.state()
    epoch = to_hop.acquire("tester")
    route = [pb.Hop(address=hop.sync, writer_epoch=epoch)]

    response = to_first.push(stamp_state(7), 2, to_first.acquire("tester"), route)

    assert response.version == 2  # the first commits on its own
    assert 0 < response.finish_seconds < 60  # its time after the commit message, hop included
    assert to_first.state().digest == state_digest(stamp_state(7))
    [result] = response.hops
    direct = refusal(Sync(hop.sync, TOKEN), stamp_state(7), 2, epoch)
    assert direct[0] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "invalid bearer token for the sync plane" in direct[2]
    assert (result.address, result.version) == (hop.sync, 0)
    assert (result.code, result.reason, result.message) == direct
    after = to_hop.state()
    assert (after.version, after.digest) == (before.version, before.digest)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    ca = make_ca(directory, "ca")
    make_cert(directory, "server", ca, f"DNS:{SERVER_NAME},IP:127.0.0.1")
    return directory


def test_with_tls_and_a_token_on_every_hop_a_hop_refuses_where_a_direct_push_would(
    services: Services, pki: Path
) -> None:
    services.env.update(
        INFERENCE_SYNC_TOKEN=TOKEN,
        INFERENCE_TLS_CERT=str(pki / "server.pem"),
        INFERENCE_TLS_KEY=str(pki / "server.key"),
        INFERENCE_TLS_PEER_CA=str(pki / "ca.pem"),
        TRAINER_SYNC_TOKEN=TOKEN,
        TRAINER_TLS_CA=str(pki / "ca.pem"),
    )
    ports = free_ports(3)
    relay = ["on", "off", "on"]
    replicas = [
        services.inference(
            STAMP, "--sync-listen", f"127.0.0.1:{port}", "--sync-relay", mode, name=f"replica{i}"
        )
        for i, (port, mode) in enumerate(zip(ports, relay, strict=True))
    ]
    trainer = services.trainer(STAMP, replicas, "--max-runs", "1")
    assert trainer.wait(timeout=60) == 0, services.log("trainer")
    syncs = [Sync(r.sync, TOKEN, pki) for r in replicas]
    for sync in syncs:
        state = sync.state()
        assert (state.version, state.digest) == (2, state_digest(stamp_state(1)))
    assert forwarded_to(services, "replica0") == [replicas[1].sync]
    assert forwarded_to(services, "replica1") == [replicas[2].sync]

    first, hop, other = syncs
    first_epoch, hop_epoch = first.acquire("tester"), hop.acquire("tester")
    hop.acquire("another")  # fences hop_epoch
    other_epoch = other.acquire("tester")
    before = [s.state() for s in syncs]

    # A fenced epoch on a hop: refused there exactly as a direct push under it.
    route = [pb.Hop(address=hop.address, server_name=SERVER_NAME, writer_epoch=hop_epoch)]
    response = first.push(stamp_state(5), 3, first_epoch, route)
    assert response.version == 3
    [fenced] = response.hops
    direct = refusal(hop, stamp_state(5), 3, hop_epoch)
    assert (direct[0], direct[1]) == (grpc.StatusCode.ABORTED.value[0], protocol.FENCED)
    assert (fenced.version, fenced.code, fenced.reason, fenced.message) == (0, *direct)

    # A hop whose certificate does not carry the name the route gives: not dialled, as direct.
    route = [pb.Hop(address=other.address, server_name="wrong.test", writer_epoch=other_epoch)]
    response = first.push(stamp_state(6), 4, first_epoch, route)
    assert response.version == 4
    [mismatch] = response.hops
    assert mismatch.code == grpc.StatusCode.UNAVAILABLE.value[0]
    direct = refusal(other, stamp_state(6), 4, other_epoch, server_name="wrong.test")
    assert direct[0] == mismatch.code
    for sync, was in zip((hop, other), before[1:], strict=True):
        now = sync.state()
        assert (now.version, now.digest) == (was.version, was.digest)  # untouched
    assert first.state().digest == state_digest(stamp_state(6))
