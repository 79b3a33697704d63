"""Push versions of the stamp model (tests/integration/apps.py) straight over the wire, as a
trainer would, without starting a trainer process: every tensor filled with one value."""

from __future__ import annotations

import grpc
import torch

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.grpc.channel import open_channel
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES
from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.apps import Stamp
from tests.integration.conftest import Inference, Services

PUSH = "/weightsync.v1.WeightSync/Push"
STAMP = "tests.integration.apps:stamp"


def stamp_state(megabytes: int, value: float) -> dict[str, torch.Tensor]:
    """The stamp model's state with every tensor filled with `value`."""
    stamp = Stamp(megabytes)
    with torch.no_grad():
        for part in stamp.parts:
            part.fill_(value)
    return {name: tensor.detach().clone() for name, tensor in stamp.state_dict().items()}


class StampWriter:
    """One writer of the `stamp` model on one channel (which carries any token and TLS)."""

    def __init__(self, channel: grpc.Channel, megabytes: int, writer_id: str = "tests") -> None:
        self.stub = pb_grpc.WeightSyncStub(channel)
        self._push = channel.stream_unary(
            PUSH, request_serializer=None, response_deserializer=pb.PushResponse.FromString
        )
        self._megabytes = megabytes
        self._writer_id = writer_id
        self._epoch = 0

    def acquire(self) -> int:
        lease = self.stub.AcquireWriter(
            pb.AcquireWriterRequest(model_name="stamp", writer_id=self._writer_id), timeout=10
        )
        self._epoch = int(lease.epoch)
        return self._epoch

    def push(self, value: float, version: int) -> bytes:
        """Push the stamp filled with `value` as `version` in full; return its digest."""
        state = stamp_state(self._megabytes, value)
        payload = Payload.of(list(state.items()))
        digest = state_digest(state)
        response = self.push_payload(list(payload.chunks()), payload.nbytes, version, digest)
        assert response.version == version
        return digest

    def push_payload(
        self, chunks: list[bytes], size: int, version: int, digest: bytes
    ) -> pb.PushResponse:
        """Push `chunks` (`size` bytes in all) as the payload of `version`, whatever they hold."""
        header = pb.PushHeader(
            model_name="stamp",
            version=version,
            writer_id=self._writer_id,
            payload_bytes=size,
            writer_epoch=self._epoch,
        )
        messages = [
            pb.PushRequest(header=header).SerializeToString(),
            *(pb.PushRequest(data=chunk).SerializeToString() for chunk in chunks),
            pb.PushRequest(commit=pb.PushCommit(digest=digest)).SerializeToString(),
        ]
        response: pb.PushResponse = self._push(iter(messages), timeout=60)
        return response


def pushed_once(
    services: Services, relay: str, token: str, megabytes: int
) -> tuple[Inference, StampWriter, pb.ModelState]:
    """An inference service serving the stamp model of `megabytes` (`--sync-relay relay`, sync
    token `token`), a writer holding its lease, and the state served once it pushed version 1."""
    services.env.update(INFERENCE_SYNC_TOKEN=token, TEST_STAMP_MB=str(megabytes))
    inference = services.inference(STAMP, "--sync-relay", relay)
    writer = StampWriter(
        open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, token=token), megabytes
    )
    writer.acquire()
    writer.push(3.0, 1)
    return inference, writer, inference.model_state("stamp", token=token)
