"""The service the bad-input catalogue (test_bad_input.py) runs against, and its push helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import safetensors.torch
import torch

from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.apps import MLP, Stamp
from tests.integration.conftest import Inference, Services, wait_until
from trainer_service.publisher import Publisher

MB = 1


class Bench:
    """One inference service serving version 1 of the stamp model, and an epoch to push with."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        stamp = Stamp(MB)
        with torch.no_grad():
            for i, p in enumerate(stamp.parts):
                p.fill_(float(i))
        self.state = {k: v.detach().clone() for k, v in stamp.state_dict().items()}
        publisher = Publisher([inference.sync], "catalogue-trainer")
        assert publisher.publish("stamp", self.state).version == 1
        publisher.close()
        self.channel = grpc.insecure_channel(
            inference.sync, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.push_raw = self.channel.stream_unary(
            "/weightsync.v1.WeightSync/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )
        lease = self.inference.sync_stub().AcquireWriter(
            pb.AcquireWriterRequest(model_name="stamp", writer_id="catalogue"), timeout=10
        )
        self.epoch = lease.epoch
        self.served = inference.model_state("stamp")
        self.data = oip_grpc.GRPCInferenceServiceStub(
            grpc.insecure_channel(
                inference.data, options=[("grpc.max_send_message_length", 128 << 20)]
            )
        )

    def header(self, **fields: object) -> bytes:
        payload = self.payload()
        values: dict[str, object] = {
            "model_name": "stamp",
            "version": 2,
            "base_version": 0,
            "writer_id": "catalogue",
            "payload_bytes": len(payload),
            "writer_epoch": self.epoch,
        }
        values.update(fields)
        return pb.PushRequest(header=pb.PushHeader(**values)).SerializeToString()  # type: ignore[arg-type]

    def payload(self, state: dict[str, torch.Tensor] | None = None) -> bytes:
        return b"".join(Payload.of(list((state or self.changed()).items())).chunks())

    def changed(self) -> dict[str, torch.Tensor]:
        return {k: v + 100 for k, v in self.state.items()}

    @staticmethod
    def data_msg(data: bytes) -> bytes:
        return pb.PushRequest(data=data).SerializeToString()

    @staticmethod
    def commit(digest: bytes) -> bytes:
        return pb.PushRequest(commit=pb.PushCommit(digest=digest)).SerializeToString()

    def good_digest(self) -> bytes:
        return state_digest(self.changed())

    def raw_header(self, table: object, data: bytes, length: int | None = None) -> list[bytes]:
        body = json.dumps(table).encode()
        size = len(body) if length is None else length
        blob = size.to_bytes(8, "little") + body + data
        return [self.header(payload_bytes=len(blob)), self.data_msg(blob), self.commit(b"x" * 16)]


def assert_untouched(bench: Bench) -> None:
    """The served stamp model is still the version and digest the bench last recorded, and the
    refused push is dropped (the service may see its stream end a moment after the client got
    the refusal: gRPC itself refuses an oversized message)."""
    now = bench.inference.model_state("stamp")
    assert (now.version, now.digest) == (bench.served.version, bench.served.digest)
    wait_until(lambda: not bench.inference.model_state("stamp").HasField("pending"), timeout=10)
    now = bench.inference.model_state("stamp")
    assert (now.version, now.digest) == (bench.served.version, bench.served.digest)


def serving_bench(tmp: Path) -> Iterator[Bench]:
    """One inference service for the catalogue, stopped when the generator is closed."""
    pretrained = tmp / "frozen.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TEST_PRETRAINED": str(pretrained),
        "TEST_STAMP_MB": str(MB),
    }
    with Services(tmp, env) as services:
        inference = services.inference(
            "tests.integration.apps:catalogue",
            "--max-push-bytes",
            str(32 << 20),
            "--max-header-bytes",
            str(1 << 16),
        )
        yield Bench(inference)
