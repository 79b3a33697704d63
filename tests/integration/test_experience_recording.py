"""Collection at the server with real processes: the inference service records the requests a
model serves (declared in the app, or asked for with the OIP parameter `record`) into the
trainer's buffers over the experience plane, refuses to record into buffers the app does not
declare or that the model cannot fill, and counts what it drops while the trainer is away,
answering every request meanwhile; records a request of thousands of rows bit-exact; says so
when `--experience` names a port that serves no experience plane; and reaches a trainer that
requires mutual TLS and a token."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
import torch

from devtools.ports import free_port
from shared import protocol
from shared.data.persist import load_samples
from shared.data.remote import RemoteDataCollector
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as pb_grpc
from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.grpc.auth import TlsFiles
from shared.grpc.channel import open_channel
from shared.grpc.errors import error_reason
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.pki import SERVER_NAME
from tests.integration.test_experience import start_trainer

APP = "tests.integration.experience_apps:recorded"


def request(x: torch.Tensor, **parameters: str | int) -> oip.ModelInferRequest:
    message = oip.ModelInferRequest(model_name="scale")
    message.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(x.numpy().tobytes())
    for key, value in parameters.items():
        if isinstance(value, str):
            message.parameters[key].string_param = value
        else:
            message.parameters[key].int64_param = value
    return message


def infer(inference: Inference, message: oip.ModelInferRequest) -> torch.Tensor:
    with grpc.insecure_channel(inference.data) as channel:
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=30)
    (raw,) = answer.raw_output_contents
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(-1, 1)


def refused(inference: Inference, message: oip.ModelInferRequest) -> grpc.RpcError:
    with (
        grpc.insecure_channel(inference.data) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=30)
    return error.value


def test_served_requests_are_recorded_into_the_buffers_the_app_and_the_request_name(
    services: Services,
) -> None:
    port = free_port()
    inference = services.inference(APP, "--experience", f"127.0.0.1:{port}")
    trainer = start_trainer(
        services, "--experience-listen", f"127.0.0.1:{port}", app=APP, targets=(inference.sync,)
    )
    wait_until(lambda: inference.model_state("scale").version == 1)  # the trainer's weights
    first, second = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[-4.0], [5.0]])
    answers = [infer(inference, request(first)), infer(inference, request(second, record="asked"))]

    error = refused(inference, request(first, record="nowhere"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == protocol.BUFFER_NOT_FOUND
    assert "parameter 'record': the app declares no buffer 'nowhere'" in error.details()
    error = refused(inference, request(first, record="elsewhere"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "model 'scale' cannot record into buffer 'elsewhere': the buffer's samples hold 'z', "
        "which the model neither takes nor returns" in error.details()
    )
    error = refused(inference, request(first, record=7))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'record' names a buffer to record the request into" in error.details()

    def received() -> dict[str, int]:
        return {b.name: b.received for b in trainer.buffers().buffers}

    wait_until(lambda: received() == {"served": 5, "asked": 2, "elsewhere": 0})
    trainer.process.send_signal(signal.SIGTERM)  # it checkpoints its buffers as it stops
    assert trainer.process.wait(timeout=60) == 0
    data = trainer.state / "checkpoint" / "data"
    served = load_samples(data / "served" / "buffer.safetensors")
    assert torch.equal(torch.stack([s["x"] for s in served]), torch.cat([first, second]))
    assert torch.equal(torch.stack([s["y"] for s in served]), torch.cat(answers))
    asked = load_samples(data / "asked" / "buffer.safetensors")
    assert torch.equal(torch.stack([s["x"] for s in asked]), second)
    assert inference.metric('weightsync_inference_recorded_samples_total{buffer="served"}') == 5


def test_requests_are_answered_and_drops_counted_while_the_trainer_is_away(
    services: Services,
) -> None:
    inference = services.inference(APP, "--experience", f"127.0.0.1:{free_port()}")
    rows = 12_000  # over the 10,000 samples a collector keeps waiting for its trainer
    x = torch.arange(rows, dtype=torch.float32).reshape(-1, 1)
    assert infer(inference, request(x)).shape == (rows, 1)  # answered; nobody takes the samples
    dropped = 'weightsync_inference_recorded_dropped_total{buffer="served",cause="trainer"}'
    wait_until(lambda: inference.metric(dropped) == rows - 10_000)
    assert inference.metric('weightsync_inference_recorded_samples_total{buffer="served"}') == rows


def test_recording_reaches_a_trainer_that_requires_mutual_tls_and_a_token(
    services: Services, pki: Path
) -> None:
    services.env.update(
        INFERENCE_EXPERIENCE_TOKEN="recorders-only",
        TRAINER_EXPERIENCE_TOKEN="recorders-only",
        TRAINER_EXPERIENCE_TLS_CERT=str(pki / "server.pem"),
        TRAINER_EXPERIENCE_TLS_KEY=str(pki / "server.key"),
        TRAINER_EXPERIENCE_TLS_CLIENT_CA=str(pki / "ca.pem"),
    )
    port = free_port()
    inference = services.inference(
        APP,
        "--experience",
        f"127.0.0.1:{port}",
        "--experience-tls-ca",
        str(pki / "ca.pem"),
        "--experience-tls-cert",
        str(pki / "client.pem"),
        "--experience-tls-key",
        str(pki / "client.key"),
        "--experience-tls-server-name",
        SERVER_NAME,
    )
    trainer = start_trainer(
        services, "--experience-listen", f"127.0.0.1:{port}", app=APP, targets=(inference.sync,)
    )
    x = torch.tensor([[1.0], [2.0], [3.0]])
    answer = infer(inference, request(x))

    tls = TlsFiles(pki / "client.pem", pki / "client.key", pki / "ca.pem")
    with open_channel(
        trainer.address, 1 << 20, token="recorders-only", tls=tls, server_name=SERVER_NAME
    ) as channel:
        stub = pb_grpc.ExperienceStub(channel)

        def received() -> int:
            answer = stub.ListBuffers(pb.ListBuffersRequest(), timeout=10)
            return next(b.received for b in answer.buffers if b.name == "served")

        wait_until(lambda: received() == 3)
    trainer.process.send_signal(signal.SIGTERM)  # it checkpoints its buffers as it stops
    assert trainer.process.wait(timeout=60) == 0
    served = load_samples(trainer.state / "checkpoint" / "data" / "served" / "buffer.safetensors")
    assert torch.equal(torch.stack([s["x"] for s in served]), x)
    assert torch.equal(torch.stack([s["y"] for s in served]), answer)
    dropped = 'weightsync_inference_recorded_dropped_total{buffer="served",cause="trainer"}'
    assert inference.metric(dropped) == 0


def test_every_row_of_a_large_request_arrives_bit_exact_with_the_trainer_up(
    services: Services,
) -> None:
    port = free_port()
    inference = services.inference(APP, "--experience", f"127.0.0.1:{port}")
    trainer = start_trainer(
        services, "--experience-listen", f"127.0.0.1:{port}", app=APP, targets=(inference.sync,)
    )
    wait_until(lambda: inference.model_state("scale").version == 1)  # the trainer's weights
    rows = 30_000  # over the 10,000 samples a collector keeps: recording waits for the trainer
    x = torch.randn(rows, 1, generator=torch.Generator().manual_seed(7))
    answer = infer(inference, request(x))

    def received() -> int:
        return int(next(b.received for b in trainer.buffers().buffers if b.name == "served"))

    wait_until(lambda: received() == rows)
    trainer.process.send_signal(signal.SIGTERM)  # it checkpoints its buffers as it stops
    assert trainer.process.wait(timeout=60) == 0
    served = load_samples(trainer.state / "checkpoint" / "data" / "served" / "buffer.safetensors")
    assert torch.equal(torch.stack([s["x"] for s in served]), x)
    assert torch.equal(torch.stack([s["y"] for s in served]), answer)
    assert inference.metric('weightsync_inference_recorded_samples_total{buffer="served"}') == rows
    dropped = 'weightsync_inference_recorded_dropped_total{buffer="served",cause="trainer"}'
    assert inference.metric(dropped) == 0


WRONG_PORT = (
    "UNIMPLEMENTED: Method not found! (the address serves no experience.v1.Experience: is it "
    "another port of the service, its data plane's say, or another server's?)"
)


def test_an_experience_address_that_serves_no_experience_plane_is_reported(
    services: Services,
) -> None:
    other = services.inference(APP, name="other")  # its data plane is no trainer's
    inference = services.inference(APP, "--experience", other.data)
    x = torch.tensor([[1.0], [2.0]])
    assert infer(inference, request(x)).shape == (2, 1)  # answered all the same
    wait_until(lambda: WRONG_PORT in inference.log.read_text())
    assert f"buffer served at {other.data}: the trainer at {other.data}: {WRONG_PORT}" in (
        inference.log.read_text()
    )

    collector = RemoteDataCollector(other.data, "served", timeout_s=5)
    try:
        collector.collect({"x": torch.zeros(1), "y": torch.zeros(1)})

        def reported() -> bool:
            return WRONG_PORT in (collector.stats.last_error or "")

        wait_until(reported)
        assert collector.stats.last_error == f"the trainer at {other.data}: {WRONG_PORT}"
    finally:
        stats = collector.close(timeout=0)
    assert (stats.collected, stats.acknowledged, stats.dropped) == (1, 0, 1)
