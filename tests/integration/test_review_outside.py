"""What a review from outside found, probing the newest surfaces as an unfriendly client and a
careless user would, each with real processes over gRPC: Collect calls that go quiet or never
read their acknowledgements are ended and free their slot; a collector id of a megabyte is
refused; one collector id may number the batches of each buffer on its own; a recorded model
whose first input is BYTES records every row; a refusal that echoes a huge name keeps its code;
a hop address whose port is beyond 65535 (which gRPC dials modulo 65536) is refused, by Seed
and in a push's route, with nothing swapped; a writer id over 256 bytes is refused by
AcquireWriter and in a push; a trainer or a seed that dials a data plane for a sync plane is
told the address serves none (a trainer, and one whose token is not taken, stops with status
2); and a service whose listen address is taken exits with one line naming it."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import safetensors.torch
import torch

from devtools.launch import inference_command, trainer_command
from shared import protocol
from shared.data.batch import encode_columns
from shared.data.persist import load_samples
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as sync_pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as sync_grpc
from shared.grpc.errors import error_reason
from tests.integration.apps import MLP
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.test_experience import APP as STEPS
from tests.integration.test_experience import good, start_trainer
from tests.integration.test_experience_recording import free_port
from tests.integration.test_forwarding import Sync, push_requests, stamp_state
from tests.integration.test_seed import seed, seed_refusal, started_pair

COLLECT = "/experience.v1.Experience/Collect"
SYNC = "weightsync.v1.WeightSync"
IDLE = ("--experience-idle-timeout-s", "1", "--experience-streams", "1")


def batch(first: int, count: int, sequence: int) -> bytes:
    """A Batch of the ids `first` onwards for the `steps` buffer, serialized."""
    message: bytes = pb.Batch(
        buffer="steps", sequence=sequence, payload=good(first, count)
    ).SerializeToString()
    return message


def collect_once(address: str, message: bytes) -> pb.BatchAck:
    """One Collect call carrying `message` alone: its acknowledgement."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(COLLECT, None, pb.BatchAck.FromString)
        answers: list[pb.BatchAck] = list(call(iter([message]), timeout=30))
    (answer,) = answers
    return answer


def test_a_collect_call_that_goes_quiet_is_ended_and_frees_its_slot(services: Services) -> None:
    trainer = start_trainer(services, *IDLE)  # one slot: the quiet call holds it until ended
    quiet = threading.Event()

    def messages() -> Iterator[bytes]:
        yield batch(0, 2, 1)
        quiet.wait()  # then nothing, the stream open: a hung agent, a forgotten stream

    with grpc.insecure_channel(trainer.address) as channel:
        call = channel.stream_stream(COLLECT, None, pb.BatchAck.FromString)(messages(), timeout=30)
        try:
            first = next(call)
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
        finally:
            quiet.set()
    assert (first.sequence, first.samples) == (1, 2)
    error = ended.value
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert "the Collect call sent no batch and took no acknowledgement for 1s" in (
        error.details() or ""
    )
    # Its slot is free again (once its handler has unwound): the next agent's batch is stored.
    wait_until(lambda: stored_when_free(trainer.address, batch(2, 2, 1)), timeout=30)
    assert trainer.stop() == [0, 1, 2, 3]  # the quiet call's batch stayed stored


def test_a_collect_call_that_never_reads_its_acknowledgements_is_ended_and_frees_its_slot(
    services: Services,
) -> None:
    trainer = start_trainer(services, *IDLE)
    # A fixed receive window (no BDP growth): the trainer's acknowledgements fill it quickly
    # and it then waits for room to send the next one, which never comes.
    options = [("grpc.http2.bdp_probe", 0)]

    def messages() -> Iterator[bytes]:
        for sequence in range(1, 20_001):
            yield batch(sequence, 1, sequence)

    with grpc.insecure_channel(trainer.address, options=options) as deaf:
        call = deaf.stream_stream(COLLECT, None, pb.BatchAck.FromString)(messages(), timeout=60)
        try:
            assert next(call).samples == 1  # it holds the slot; from now on it reads nothing
            wait_until(lambda: stored_when_free(trainer.address, batch(0, 1, 1)), timeout=30)
        finally:
            call.cancel()
    assert "the Collect call sent no batch and took no acknowledgement" in services.log("trainer")


def stored_when_free(address: str, message: bytes) -> bool:
    """Whether a call carrying `message` alone had it stored; False when the trainer's one
    slot is still taken."""
    try:
        return collect_once(address, message).samples > 0
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False


def test_one_collector_id_numbering_two_buffers_from_one_loses_neither(
    services: Services,
) -> None:
    # An agent with one id feeding two buffers, each batch numbered within its buffer.
    trainer = start_trainer(services, app="tests.integration.experience_apps:recorded")
    x = {"x": torch.tensor([[1.5]])}
    messages = [
        pb.Batch(buffer=name, sequence=1, collector_id="agent-7", payload=payload)
        for name, payload in (
            ("asked", encode_columns(x)),
            ("served", encode_columns({**x, "y": torch.tensor([[3.0]])})),
        )
    ]
    with grpc.insecure_channel(trainer.address) as channel:
        call = channel.stream_stream(COLLECT, None, pb.BatchAck.FromString)
        acks = list(call(iter(m.SerializeToString() for m in messages), timeout=30))
    assert [(a.buffer, a.samples, a.duplicate) for a in acks] == [
        ("asked", 1, False),
        ("served", 1, False),
    ]
    received = {b.name: b.received for b in trainer.buffers().buffers}
    assert received == {"asked": 1, "served": 1, "elsewhere": 0}


def test_a_batch_whose_collector_id_is_a_megabyte_is_refused_and_stores_nothing(
    services: Services,
) -> None:
    # The trainer remembers each sender's id (4,096 of them): ids of megabytes would pin GiB.
    trainer = start_trainer(services)
    huge = pb.Batch(buffer="steps", sequence=1, collector_id="c" * (1 << 20), payload=good(0, 2))
    with pytest.raises(grpc.RpcError) as refused:
        collect_once(trainer.address, huge.SerializeToString())
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_BATCH
    assert "its collector_id has 1048576 characters; at most 256" in (error.details() or "")
    assert collect_once(trainer.address, batch(2, 2, 1)).samples == 2  # the next is stored
    assert trainer.stop() == [2, 3]


def test_a_recorded_model_whose_first_input_is_bytes_records_every_row(
    services: Services,
) -> None:
    spoken = "tests.integration.experience_apps:spoken"
    port = free_port()
    inference = services.inference(spoken, "--experience", f"127.0.0.1:{port}")
    experience = ("--experience-listen", f"127.0.0.1:{port}")
    trainer = start_trainer(services, *experience, app=spoken, targets=(inference.sync,))
    wait_until(lambda: inference.model_state("words").version == 1)  # the trainer's weights
    words = [b"a", b"bb", b"cccc"]
    message = oip.ModelInferRequest(model_name="words")
    message.inputs.add(name="text", datatype="BYTES", shape=[len(words)])
    message.raw_input_contents.append(b"".join(struct.pack("<I", len(w)) + w for w in words))
    with grpc.insecure_channel(inference.data) as channel:
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=30)
    lengths = torch.frombuffer(bytearray(answer.raw_output_contents[1]), dtype=torch.float32)
    assert lengths.tolist() == [1.0, 2.0, 4.0]
    # One sample per row, as the rows of the tensor recorded (not of the BYTES input) count.
    wait_until(lambda: trainer.buffers().buffers[0].received == len(words), timeout=30)
    trainer.process.terminate()  # it checkpoints its buffers as it stops
    assert trainer.process.wait(timeout=60) == 0
    saved = load_samples(trainer.state / "checkpoint" / "data" / "lengths" / "buffer.safetensors")
    assert torch.equal(torch.stack([s["length"] for s in saved]), lengths)


def test_a_refusal_that_echoes_a_megabyte_name_keeps_its_code_on_every_plane(
    services: Services,
) -> None:
    # The message names what was not found; at full length it would be a 1 MB trailer, which
    # gRPC clients refuse (RESOURCE_EXHAUSTED, message lost) instead of the refusal.
    recorded = "tests.integration.experience_apps:recorded"
    inference = services.inference(recorded, "--experience", f"127.0.0.1:{free_port()}")
    trainer = start_trainer(services, app=recorded, targets=(inference.sync,))
    wait_until(lambda: inference.model_state("scale").version == 1)  # the trainer's weights
    name = "n" * 1_000_000
    refusals = []
    with grpc.insecure_channel(inference.data) as channel:
        infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        message = oip.ModelInferRequest(model_name=name)
        with pytest.raises(grpc.RpcError) as unknown_model:
            infer(message, timeout=30)
        refusals.append((unknown_model.value, protocol.MODEL_NOT_FOUND, "no model named 'nnn"))
        message = oip.ModelInferRequest(model_name="scale")
        message.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        message.raw_input_contents.append(struct.pack("<f", 1.0))
        message.parameters["record"].string_param = name
        with pytest.raises(grpc.RpcError) as unknown_buffer:
            infer(message, timeout=30)
        refusals.append(
            (unknown_buffer.value, protocol.BUFFER_NOT_FOUND, "the app declares no buffer 'nnn")
        )
    with grpc.insecure_channel(inference.sync) as channel:  # through the sync relay
        get = sync_grpc.WeightSyncStub(channel).GetModel
        with pytest.raises(grpc.RpcError) as unknown_model:
            get(sync_pb.GetModelRequest(model_name=name), timeout=30)
        refusals.append((unknown_model.value, protocol.MODEL_NOT_FOUND, "no model named 'nnn"))
    with grpc.insecure_channel(trainer.address) as channel:
        collect = channel.stream_stream(COLLECT, None, pb.BatchAck.FromString)
        batch = pb.Batch(buffer=name, sequence=1, payload=good(0, 1)).SerializeToString()
        with pytest.raises(grpc.RpcError) as unknown_buffer:
            list(collect(iter([batch]), timeout=30))
        refusals.append(
            (unknown_buffer.value, protocol.BUFFER_NOT_FOUND, "holds no buffer named 'nnn")
        )
    for error, reason, says in refusals:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        assert error_reason(error) == reason
        details = error.details() or ""
        assert says in details and details.endswith(" bytes cut)"), details[:200]
        assert len(details.encode()) <= 2048  # shared/grpc/errors.py's MAX_MESSAGE_BYTES
    assert inference.model_state("scale").version == 1  # untouched


def test_a_seed_to_a_port_beyond_65535_is_refused_not_dialled_modulo(
    services: Services, tmp_path: Path
) -> None:
    _, hop, to_donor, to_hop = pair(services, tmp_path)
    before = to_hop.state()
    port = int(hop.sync.rsplit(":", 1)[1])
    aliased = sync_pb.Hop(address=f"127.0.0.1:{port + 65536}", writer_epoch=to_hop.acquire("t"))
    error = seed_refusal(to_donor, 3, aliased)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"'127.0.0.1:{port + 65536}' names port {port + 65536}, outside 1 to 65535" in (
        error.details() or ""
    )
    now = to_hop.state()  # the hop it aliases was not pushed to
    assert (now.version, now.digest) == (before.version, before.digest)


def test_a_route_naming_its_receiver_by_a_port_beyond_65535_is_refused_and_swaps_nothing(
    services: Services, tmp_path: Path
) -> None:
    donor, _, to_donor, _ = pair(services, tmp_path)
    before = to_donor.state()
    port = int(donor.sync.rsplit(":", 1)[1])
    epoch = to_donor.acquire("tester")
    itself = [sync_pb.Hop(address=f"127.0.0.1:{port + 65536}", writer_epoch=epoch)]
    with pytest.raises(grpc.RpcError) as refused:
        to_donor.push(stamp_state(8), 4, epoch, route=itself)
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_PUSH
    assert "a hop of the push header's route" in (error.details() or "")
    assert "outside 1 to 65535" in (error.details() or "")
    now = to_donor.state()
    assert (now.version, now.digest) == (before.version, before.digest)
    assert not now.HasField("pending")


def test_a_writer_id_over_256_bytes_is_refused_by_acquire_writer_and_in_a_push(
    services: Services, tmp_path: Path
) -> None:
    """A writer id is recorded with every version, on disk, in log lines and in answers: one of
    megabytes would be copied into each of them."""
    _, _, to_donor, _ = pair(services, tmp_path)
    before = to_donor.state()
    huge = "W" * (1 << 20)
    with pytest.raises(grpc.RpcError) as refused:
        to_donor.acquire(huge)
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_PUSH
    assert "is 1048576 bytes in UTF-8; at most 256" in (error.details() or "")
    assert to_donor.state().writer_epoch == before.writer_epoch  # no grant
    epoch = to_donor.acquire("é" * 128)  # 256 bytes: the most taken
    messages = list(push_requests(stamp_state(8), 4, epoch))
    messages[0].header.writer_id = "é" * 128 + "x"  # 257 bytes
    with pytest.raises(grpc.RpcError) as refused:
        to_donor.stub().Push(iter(messages), timeout=30, metadata=to_donor.metadata)
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_PUSH
    assert "the push header: the writer_id" in (error.details() or "")
    now = to_donor.state()
    assert (now.version, now.digest) == (before.version, before.digest)
    assert not now.HasField("pending")
    messages[0].header.writer_id = "é" * 128
    to_donor.stub().Push(iter(messages), timeout=30, metadata=to_donor.metadata)
    assert (to_donor.state().version, to_donor.state().writer_id) == (4, "é" * 128)


def test_a_trainer_pointed_at_a_data_plane_says_the_address_serves_no_sync_plane(
    services: Services,
) -> None:
    """It says so and stops with status 2: waiting for the address would never end."""
    inference = services.inference("tests.integration.apps:stamp")
    command = trainer_command("tests.integration.apps:stamp", (inference.data,))
    trainer = services.spawn([*command, "--metrics-listen", "off"], "trainer")
    assert trainer.wait(timeout=60) == 2, services.log("trainer")
    log = services.log("trainer")
    wanted = f"{inference.data}: UNIMPLEMENTED: Method not found! (the address serves no {SYNC}"
    assert wanted in log
    assert "check --inference, the sync token" in log
    assert "Traceback" not in log
    assert inference.model_state("stamp").version == 0


def test_a_trainer_whose_sync_token_is_not_taken_stops_with_status_2(services: Services) -> None:
    services.env["INFERENCE_SYNC_TOKEN"] = "right"
    inference = services.inference("tests.integration.apps:stamp")
    services.env["TRAINER_SYNC_TOKEN"] = "wrong"
    trainer = services.trainer("tests.integration.apps:stamp", [inference], "--max-runs", "1")
    assert trainer.wait(timeout=60) == 2, services.log("trainer")
    log = services.log("trainer")
    assert "UNAUTHENTICATED: invalid bearer token" in log
    assert "check --inference, the sync token (--sync-token / TRAINER_SYNC_TOKEN)" in log
    assert "Traceback" not in log
    assert inference.model_state("stamp", token="right").version == 0


def test_a_seed_to_a_data_plane_says_the_hop_serves_no_sync_plane(
    services: Services, tmp_path: Path
) -> None:
    _, hop, to_donor, to_hop = pair(services, tmp_path)
    result = seed(to_donor, 3, sync_pb.Hop(address=hop.data, writer_epoch=to_hop.acquire("t")))
    assert (result.address, result.version) == (hop.data, 0)
    assert result.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert f"the address serves no {SYNC}" in result.message
    assert to_hop.state().version == 0


@pytest.mark.parametrize("flag", ["--experience-listen", "--metrics-listen"])
def test_a_trainer_whose_listen_address_is_taken_exits_with_a_line_naming_it(
    services: Services, flag: str
) -> None:
    first = start_trainer(services, "--metrics-listen", "127.0.0.1:0")
    taken = first.address
    if flag == "--metrics-listen":
        taken = "127.0.0.1:" + services.log("trainer").split("metrics on port ")[1].split()[0]
    command = trainer_command(STEPS, ("127.0.0.1:1",), "--experience-listen", "127.0.0.1:0")
    command += ["--metrics-listen", "off", "--state-dir", str(services.directory / "second")]
    second = services.spawn([*command, flag, taken], "second")
    assert second.wait(timeout=60) == 2
    log = services.log("second")
    assert f"{flag}: cannot listen on {taken}" in log
    assert "Traceback" not in log


def test_an_inference_service_whose_metrics_address_is_taken_names_it(
    services: Services,
) -> None:
    first = services.inference("tests.integration.apps:stamp", name="first")
    taken = first.metrics_url.split("//")[1].split("/")[0]
    ready = services.directory / "second.ready.json"
    command = inference_command("tests.integration.apps:stamp", ready, "--metrics-listen", taken)
    second = services.spawn([*command, "--sync-relay", "off"], "second")
    assert second.wait(timeout=60) == 2
    log = services.log("second")
    assert f"cannot listen on {taken} for metrics: Address already in use" in log
    assert "Traceback" not in log


def pair(services: Services, tmp_path: Path) -> tuple[Inference, Inference, Sync, Sync]:
    """test_seed's donor (serving version 3, behind its sync relay) and hop, with its models:
    a 1 MiB stamp model and an inference-only one."""
    services.env["TEST_STAMP_MB"] = "1"
    pretrained = tmp_path / "frozen.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    services.env["TEST_PRETRAINED"] = str(pretrained)
    return started_pair(services, "on")
