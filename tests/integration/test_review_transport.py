"""Hostile clients at the transport level, speaking HTTP/2 and gRPC's framing by hand
(tests/integration/raw_http2.py) to the data plane, the sync plane (with and without the sync
relay) and the trainer's experience plane.

A compression bomb: a gRPC message sent compressed (`grpc-encoding: gzip` or `deflate`), a
fraction of a MB on the wire that inflates to hundreds of MB, past every plane's message limit.
gRPC inflates a compressed message whole before it compares its size with the limit, so the
services take uncompressed messages only: the call is refused as UNIMPLEMENTED before anything
is inflated, the process's memory stays where it was, and the service serves others as before.
"""

from __future__ import annotations

import grpc
import pytest

from shared.gen.experience.v1 import experience_pb2 as xpb
from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.integration.conftest import Services
from tests.integration.raw_http2 import Connection, bytes_field, deflated_zeros, grpc_frame
from tests.integration.stamp_writer import PUSH, pushed_once
from tests.integration.test_experience import start_trainer
from tests.integration.test_review_outside import batch, collect_once

TOKEN = "sync-secret"
MiB = 1 << 20
BOMB = 256 * MiB  # inflated: four times the data plane's limit, sixteen times the sync plane's
GROWTH = 64 * MiB  # what the process's peak memory may grow by while refusing it
GZIP, DEFLATE = 31, 15  # zlib's wbits for each encoding
ENCODINGS = {"gzip": GZIP, "deflate": DEFLATE}
UNIMPLEMENTED = str(grpc.StatusCode.UNIMPLEMENTED.value[0])
INFER = "/inference.GRPCInferenceService/ModelInfer"
COLLECT = "/experience.v1.Experience/Collect"


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def field(message: type, name: str) -> int:
    number: int = message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]
    return number


def bomb(
    address: str, path: str, prefix: bytes, encoding: str, *extra: tuple[str, str]
) -> tuple[str | None, str | None]:
    """Send one message to `path`: `prefix` (the start of a message whose last field is a
    `BOMB`-byte bytes field) and BOMB zero bytes, compressed; the call's status and message."""
    body = deflated_zeros(prefix, BOMB, ENCODINGS[encoding])
    assert len(body) < MiB
    connection = Connection(address)
    try:
        stream = connection.open(path, ("grpc-encoding", encoding), *extra)
        connection.send(stream, grpc_frame(body, compressed=True), end=True)
        return connection.status(stream)
    finally:
        connection.close()


def assert_refused(status: tuple[str | None, str | None], encoding: str) -> None:
    code, message = status
    assert (code, message) == (UNIMPLEMENTED, f"Compression algorithm '{encoding}' is disabled.")


def assert_bounded(pids: list[int], before: dict[int, int]) -> None:
    for pid in pids:
        grown = peak_memory(pid) - before[pid]
        assert grown < GROWTH, f"process {pid}: peak memory grew {grown >> 20} MiB"


@pytest.mark.parametrize("relay", ["on", "off"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_message_is_refused_before_it_is_inflated_on_the_data_and_sync_planes(
    services: Services, relay: str, encoding: str
) -> None:
    inference, writer, served = pushed_once(services, relay, TOKEN, 1)
    pids = [inference.process.pid, *([inference.relay_pid] if inference.relay_pid else [])]
    before = {pid: peak_memory(pid) for pid in pids}

    infer = b"\x0a\x05stamp" + bytes_field(field(oip.ModelInferRequest, "raw_input_contents"), BOMB)
    assert_refused(bomb(inference.data, INFER, infer, encoding), encoding)
    push = bytes_field(field(pb.PushRequest, "data"), BOMB)
    auth = ("authorization", f"Bearer {TOKEN}")
    assert_refused(bomb(inference.sync, PUSH, push, encoding, auth), encoding)

    assert_bounded(pids, before)
    now = inference.model_state("stamp", token=TOKEN)
    assert (now.version, now.digest) == (served.version, served.digest)
    assert not now.HasField("pending")
    data = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(inference.data))
    assert data.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
    digest = writer.push(4.0, 2)  # and the model still takes a good push
    now = inference.model_state("stamp", token=TOKEN)
    assert (now.version, now.digest) == (2, digest)
    assert "Traceback" not in inference.log.read_text()


def test_a_compressed_batch_is_refused_before_it_is_inflated_on_the_experience_plane(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    pid = trainer.process.pid
    before = {pid: peak_memory(pid)}
    collect = b"\x0a\x05steps" + bytes_field(field(xpb.Batch, "payload"), BOMB)
    for encoding in ENCODINGS:
        assert_refused(bomb(trainer.address, COLLECT, collect, encoding), encoding)
    assert_bounded([pid], before)
    assert collect_once(trainer.address, batch(0, 4, 1)).sequence == 1  # others still served
    assert "Traceback" not in services.log("trainer")
