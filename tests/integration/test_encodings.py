"""Served dtype and encoded deltas end to end: real trainer and inference processes over gRPC.

The model trains in fp32 and is served in bf16 (tests/integration/encoding_apps.py); served
weights must be bit-exact to the trained ones converted, whether the deltas travel whole or
encoded, and a receiver that lost its base gets whole tensors.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
import tritonclient.grpc as triton

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights.digest import state_digest
from shared.weights.encoding import SPARSE, XOR_ZSTD, encode
from shared.weights.writer import Payload
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.encoding_apps import Wide
from trainer_service.encoding_choice import host_bytes
from trainer_service.publisher import Publisher

APP = "tests.integration.encoding_apps:served_bf16"
X = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)


def trained_bf16(state_dir: Path) -> dict[str, torch.Tensor]:
    """The trainer's last weights (its checkpoint, fp32) converted to bf16."""
    trained = safetensors.torch.load_file(state_dir / "checkpoint" / "models" / "wide.safetensors")
    assert all(t.dtype == torch.float32 for t in trained.values())
    return {name: t.to(torch.bfloat16) for name, t in trained.items()}


def assert_serves(inference: Inference, expected: dict[str, torch.Tensor], version: int) -> None:
    state = inference.model_state("wide")
    assert state.version == version
    assert {t.name: t.dtype for t in state.tensors} == {name: "BF16" for name in expected}
    assert state.digest == state_digest(expected)  # every tensor, bit for bit


def test_a_model_trained_in_fp32_is_served_in_bf16_bit_exactly(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(APP)
    state_dir = tmp_path / "trainer"
    trainer = services.trainer(
        APP, [inference], "--max-runs", "3", "--state-dir", str(state_dir), "--log-level", "DEBUG"
    )
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    # On loopback the wire outruns any encoder: `auto` sends whole tensors, deltas included.
    travelled = re.findall(
        r"\((full|delta on \d+)\) committed on .*tensors: (.*)", services.log("trainer")
    )
    assert [kind for kind, _ in travelled] == ["full", "delta on 1", "delta on 2", "delta on 3"]
    assert all(re.fullmatch(r"whole=\d+", tensors) for _, tensors in travelled), travelled
    assert_serves(inference, trained_bf16(state_dir), 4)  # the start's sync, then one per run
    client = triton.InferenceServerClient(url=inference.data)
    tensor = triton.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    assert client.infer("wide", [tensor], client_timeout=10).as_numpy("y").shape == (3, 4)
    assert "(delta on 3" in services.log("inference")


def committed(log: str) -> list[str]:
    """How each push the log records was committed: 'full' or 'delta on N'."""
    return re.findall(r"committed version \d+ from \S+ \((full|delta on \d+)", log)


def test_sparse_deltas_stay_bit_exact_and_a_receiver_without_its_base_gets_whole_tensors(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(APP, name="first")
    state_dir = tmp_path / "trainer"
    trainer = services.trainer(
        APP,
        [inference],
        *("--max-runs", "14", "--run-interval", "0.3", "--state-dir", str(state_dir)),
        *("--push-encoding", "sparse", "--log-level", "DEBUG"),
    )
    wait_until(lambda: inference.model_state("wide").version >= 4, timeout=60)
    sparse = re.findall(r"tensors: sparse=(\d+)", services.log("trainer"))
    assert sparse and all(int(n) >= 1 for n in sparse), services.log("trainer")

    # The replica restarts on the same address without its state: it serves version 0 and
    # holds no base, so the trainer catches it up with whole tensors, then encodes again.
    inference.process.send_signal(signal.SIGTERM)
    assert inference.process.wait(timeout=30) == 0
    again = services.inference(APP, "--sync-listen", inference.sync, name="again")
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    kinds = committed(services.log("again"))
    assert kinds[0] == "full" and kinds[-1].startswith("delta on"), kinds
    assert_serves(again, trained_bf16(state_dir), 15)
    assert len(re.findall(r"tensors: sparse=", services.log("trainer"))) > len(sparse)


class RawPusher:
    """Version 1 of the bf16 model pushed by a publisher, then raw pushes under a fresh lease."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        torch.manual_seed(3)
        self.state = {k: v.to(torch.bfloat16) for k, v in Wide().state_dict().items()}
        publisher = Publisher([inference.sync], "raw-trainer")
        assert publisher.publish("wide", self.state).version == 1
        publisher.close()
        channel = grpc.insecure_channel(inference.sync)
        self.push = channel.stream_unary(
            "/weightsync.v1.WeightSync/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )
        lease = inference.sync_stub().AcquireWriter(
            pb.AcquireWriterRequest(model_name="wide", writer_id="raw"), timeout=10
        )
        self.epoch = lease.epoch
        self.new = {
            k: torch.where(torch.rand(v.shape) < 0.03, v * 2, v) for k, v in self.state.items()
        }

    def payload(self, encoding: str) -> Payload:
        encoded = {}
        for name, tensor in self.new.items():
            data = encode(encoding, host_bytes(tensor), host_bytes(self.state[name]), 2)
            if data is not None:
                encoded[name] = (encoding, data)
        return Payload.of(list(self.new.items()), encoded=encoded)

    def send(self, blob: bytes, base_version: int = 1) -> None:
        header = pb.PushHeader(
            model_name="wide",
            version=2,
            base_version=base_version,
            writer_id="raw",
            payload_bytes=len(blob),
            writer_epoch=self.epoch,
        )
        messages = [
            pb.PushRequest(header=header).SerializeToString(),
            pb.PushRequest(data=blob).SerializeToString(),
            pb.PushRequest(commit=pb.PushCommit(digest=state_digest(self.new))).SerializeToString(),
        ]
        self.push(iter(messages), timeout=30)


def test_corrupt_or_truncated_encoded_tensors_are_refused_and_change_nothing(
    services: Services,
) -> None:
    inference = services.inference(APP)
    raw = RawPusher(inference)
    served = inference.model_state("wide")
    sparse = b"".join(raw.payload(SPARSE).chunks())
    header_bytes = len(raw.payload(SPARSE).header)
    flipped = bytearray(sparse)
    flipped[header_bytes + 3] ^= 0xFF  # the sparse count of the first tensor
    zstd = raw.payload(XOR_ZSTD)
    cut = zstd.entries[0].end - zstd.entries[0].begin - 5  # its frame loses its last bytes
    truncated_frame = zstd.tensors[0]
    assert isinstance(truncated_frame, bytes)
    truncated = Payload(
        zstd.header, zstd.entries, [truncated_frame[:cut] + b"\0" * 5, *zstd.tensors[1:]]
    )
    cases = [
        (bytes(flipped), "sparse bytes do not decode against the base"),
        (b"".join(truncated.chunks()), "xor-zstd bytes do not decode against the base"),
    ]
    for blob, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            raw.send(blob)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert message in (caught.value.details() or "")
        now = inference.model_state("wide")
        assert (now.version, now.digest) == (served.version, served.digest)
    raw.send(sparse)  # the same push, intact, commits bit-exactly
    assert inference.model_state("wide").digest == state_digest(raw.new)
