"""The trainer's experience plane refusing what it must, with real processes: bad batches (wrong
names, dtypes, shapes, framing, buffer, size) are refused with a clear status and nothing of them
is stored, a sample no batch can carry is refused by `collect`, and the plane asks for its token
and mutual TLS, and for an explicit flag to listen open beyond loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from devtools.launch import trainer_command
from shared import protocol
from shared.data.batch import encode_columns
from shared.data.remote import RemoteDataCollector
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as pb_grpc
from shared.grpc.auth import TlsFiles
from shared.grpc.errors import error_reason
from tests.integration.conftest import Services, wait_until
from tests.integration.pki import SERVER_NAME
from tests.integration.test_experience import APP, good, start_trainer

BAD = [
    (
        "steps",
        encode_columns({"x": torch.zeros(2, 1), "y": torch.zeros(2, 1)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        protocol.MALFORMED_BATCH,
        "batch for buffer 'steps': tensor(s) id missing; its samples hold x, y, id",
    ),
    (
        "steps",
        encode_columns(
            {
                "x": torch.zeros(2, 1),
                "y": torch.zeros(2, 1),
                "id": torch.zeros(2, dtype=torch.int64),
                "reward": torch.zeros(2),
            }
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        protocol.MALFORMED_BATCH,
        "batch for buffer 'steps': tensor 'reward' is not one the buffer collects",
    ),
    (
        "steps",
        encode_columns(
            {
                "x": torch.zeros(2, 1, dtype=torch.float64),
                "y": torch.zeros(2, 1),
                "id": torch.zeros(2, dtype=torch.int64),
            }
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        protocol.MALFORMED_BATCH,
        "batch for buffer 'steps': tensor 'x' has dtype 'F64' but the buffer collects FP32",
    ),
    (
        "steps",
        encode_columns(
            {
                "x": torch.zeros(2, 3),
                "y": torch.zeros(2, 1),
                "id": torch.zeros(2, dtype=torch.int64),
            }
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        protocol.MALFORMED_BATCH,
        "batch for buffer 'steps': tensor 'x' has shape [2, 3]: samples of shape [3] but the "
        "buffer collects [1]",
    ),
    (
        "steps",
        b"\x08\x00\x00\x00\x00\x00\x00\x00not json",
        grpc.StatusCode.INVALID_ARGUMENT,
        protocol.MALFORMED_BATCH,
        "batch for buffer 'steps': the safetensors header is not JSON",
    ),
    (
        "moves",
        good(0, 1),
        grpc.StatusCode.NOT_FOUND,
        protocol.BUFFER_NOT_FOUND,
        "batch 2: this trainer holds no buffer named 'moves'; it holds: steps",
    ),
    (
        "steps",
        good(0, 2000),  # 32 kB: over the trainer's 16 KiB, within gRPC's message limit
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        protocol.RESOURCE_LIMIT,
        f"batch 2 for buffer 'steps' carries {len(good(0, 2000))} bytes; this trainer takes "
        "batches of at most 16384 (--experience-max-batch)",
    ),
]


def test_a_sample_of_a_dtype_no_batch_carries_is_refused_by_collect_and_the_agent_goes_on(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    collector = RemoteDataCollector(trainer.address, "steps")
    try:
        with pytest.raises(
            ValueError,
            match=r"tensor 'x': dtype torch\.complex128 cannot travel in a batch \(safetensors",
        ):
            collector.collect(
                {"x": torch.zeros(1, dtype=torch.complex128), "y": torch.zeros(1), "id": 0}
            )
        for i in range(3):  # the collector goes on with the samples it can send
            x = torch.tensor([i / 3])
            collector.collect({"x": x, "y": -x, "id": torch.tensor(i)})
        assert collector.flush(timeout=30)
    finally:
        stats = collector.close()
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (3, 3, 0, 0)
    assert trainer.stop() == [0, 1, 2]


def test_bad_batches_are_refused_and_nothing_of_them_is_stored(services: Services) -> None:
    trainer = start_trainer(services, "--experience-max-batch", "16KiB")
    stored = 0
    with grpc.insecure_channel(trainer.address) as channel:
        stub = pb_grpc.ExperienceStub(channel)
        for buffer, payload, code, reason, message in BAD:
            batches = [
                pb.Batch(buffer="steps", sequence=1, payload=good(stored, 2)),
                pb.Batch(buffer=buffer, sequence=2, payload=payload),
                pb.Batch(buffer="steps", sequence=3, payload=good(5000, 2)),  # never read
            ]
            acks = []
            with pytest.raises(grpc.RpcError) as refused:
                for ack in stub.Collect(iter(batches), timeout=30):
                    acks.append(ack)
            error = refused.value
            assert error.code() == code, error.details()
            assert message in error.details()
            assert error_reason(error) == reason
            assert [(a.sequence, a.samples) for a in acks] == [(1, 2)]  # the good one before
            stored += 2
            assert trainer.steps().received == stored
    assert trainer.stop() == list(range(stored))  # the good batches alone


def test_a_batch_larger_than_the_message_limit_is_refused_by_grpc(services: Services) -> None:
    trainer = start_trainer(services, "--experience-max-batch", "16KiB")
    with grpc.insecure_channel(trainer.address) as channel:
        stub = pb_grpc.ExperienceStub(channel)
        huge = pb.Batch(buffer="steps", sequence=1, payload=b"\x00" * (1 << 20))
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Collect(iter([huge]), timeout=30))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trainer.steps().received == 0


def test_the_experience_plane_takes_a_token_and_mutual_tls(services: Services, pki: Path) -> None:
    services.env.update(
        TRAINER_EXPERIENCE_TOKEN="agents-only",
        TRAINER_EXPERIENCE_TLS_CERT=str(pki / "server.pem"),
        TRAINER_EXPERIENCE_TLS_KEY=str(pki / "server.key"),
        TRAINER_EXPERIENCE_TLS_CLIENT_CA=str(pki / "ca.pem"),
    )
    trainer = start_trainer(services)
    tls = TlsFiles(pki / "client.pem", pki / "client.key", pki / "ca.pem")

    def collect(token: str | None, files: TlsFiles | None) -> tuple[int, str | None]:
        collector = RemoteDataCollector(
            trainer.address,
            "steps",
            token=token,
            tls=files,
            server_name=SERVER_NAME if files else None,
            timeout_s=2,
        )
        collector.collect({"x": torch.zeros(1), "y": torch.zeros(1), "id": torch.tensor(7)})
        collector.flush(timeout=3)
        stats = collector.close(timeout=0)
        return stats.acknowledged, stats.last_error

    acknowledged, error = collect("wrong", tls)
    assert acknowledged == 0
    assert error is not None and "UNAUTHENTICATED" in error
    assert "invalid bearer token for the experience plane" in error
    assert collect("agents-only", None)[0] == 0  # plaintext to a TLS port: no connection
    ca_only = TlsFiles(None, None, pki / "ca.pem")
    assert collect("agents-only", ca_only)[0] == 0  # no client certificate: refused
    assert collect("agents-only", tls) == (1, None)
    assert trainer.stop() == [7]


def test_an_open_experience_plane_beyond_loopback_needs_an_explicit_flag(
    services: Services,
) -> None:
    process = services.spawn(
        trainer_command(
            APP, ["127.0.0.1:1"], "--experience-listen", "0.0.0.0:0", "--metrics-listen", "off"
        ),
        "open",
    )
    assert process.wait(timeout=60) == 2
    assert (
        "the experience plane would listen on 0.0.0.0:0 with no authentication: set "
        "TRAINER_EXPERIENCE_TOKEN" in services.log("open")
    )


def test_list_buffers_answers_while_agents_streams_fill_every_slot(services: Services) -> None:
    trainer = start_trainer(services, "--experience-streams", "2")
    release = threading.Event()

    def quiet() -> Iterator[pb.Batch]:
        release.wait(120)
        return
        yield

    with grpc.insecure_channel(trainer.address) as channel:
        stub = pb_grpc.ExperienceStub(channel)
        streams = [stub.Collect(quiet(), timeout=120) for _ in range(2)]
        try:

            def full() -> bool:
                for index, stream in enumerate(streams):
                    if stream.done():  # refused while a probe held a slot: open it again
                        streams[index] = stub.Collect(quiet(), timeout=120)
                try:
                    list(stub.Collect(iter([]), timeout=10))
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "at its limit of 2 calls at once" in error.details()
                    return True
                return False  # admitted: the held streams have not reached the trainer yet

            wait_until(full, timeout=30)
            listed = stub.ListBuffers(pb.ListBuffersRequest(), timeout=10)
            assert [b.name for b in listed.buffers] == ["steps"]
        finally:
            release.set()
        for stream in streams:
            assert list(stream) == []  # ended cleanly once their agents closed them
