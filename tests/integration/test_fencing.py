"""The writer lease on a live service: a push never moves it, a grant and a commit are ordered,
what is on disk is what was last answered (across restarts too), and a push that stalls or whose
writer is fenced while it streams ends without touching the served weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import error_reason
from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.apps import Stamp
from tests.integration.conftest import ROOT, Inference, Services, wait_until

STAMP = "tests.integration.apps:stamp"
MB = 1
U64_MAX = (1 << 64) - 1


def stamp_state(version: int) -> dict[str, torch.Tensor]:
    """The stamp model's weights for `version`: each tensor a value of its own."""
    state = Stamp(MB).state_dict()
    return {
        name: torch.full_like(tensor, version * 10.0 + i)
        for i, (name, tensor) in enumerate(state.items())
    }


def payload_of(state: dict[str, torch.Tensor]) -> bytes:
    return b"".join(Payload.of(list(state.items())).chunks())


def header(version: int, epoch: int, writer: str, size: int, base: int = 0) -> bytes:
    fields = pb.PushHeader(
        model_name="stamp",
        version=version,
        base_version=base,
        writer_id=writer,
        payload_bytes=size,
        writer_epoch=epoch,
    )
    return pb.PushRequest(header=fields).SerializeToString()


def data(chunk: bytes) -> bytes:
    return pb.PushRequest(data=chunk).SerializeToString()


def commit(state: dict[str, torch.Tensor]) -> bytes:
    return pb.PushRequest(commit=pb.PushCommit(digest=state_digest(state))).SerializeToString()


def full_push(version: int, epoch: int, writer: str) -> list[bytes]:
    state = stamp_state(version)
    payload = payload_of(state)
    return [header(version, epoch, writer, len(payload)), data(payload), commit(state)]


class Sync:
    """Raw weightsync calls to one service, `stamp` model only."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        self.channel = grpc.insecure_channel(
            inference.sync, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.stub = inference.sync_stub()
        self._push = self.channel.stream_unary(
            "/weightsync.v1.WeightSync/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )

    def acquire(self, writer: str) -> int:
        request = pb.AcquireWriterRequest(model_name="stamp", writer_id=writer)
        return int(self.stub.AcquireWriter(request, timeout=20).epoch)

    def push(self, messages: Iterable[bytes], timeout: float = 20) -> pb.PushResponse:
        return self._push(iter(messages), timeout=timeout)

    def refused(self, messages: Iterable[bytes], timeout: float = 20) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            self.push(messages, timeout)
        return caught.value

    def state(self) -> pb.ModelState:
        return self.inference.model_state("stamp")


def assert_serving(sync: Sync, version: int, writer: str, epoch: int, holder: str) -> None:
    """The service serves exactly `stamp_state(version)` from `writer`, and the lease is
    (`epoch`, `holder`); no push is in progress."""
    state = sync.state()
    assert (state.version, state.digest, state.writer_id) == (
        version,
        state_digest(stamp_state(version)) if version else state_digest(Stamp(MB).state_dict()),
        writer,
    )
    assert (state.writer_epoch, state.lease_holder) == (epoch, holder)
    assert not state.HasField("pending")


def lease_file(state_dir: Path) -> object:
    return json.loads((state_dir / "models" / "stamp" / "writer.json").read_text())


def restart(services: Services, inference: Inference, *extra: str, name: str) -> Inference:
    inference.process.send_signal(signal.SIGTERM)
    assert inference.process.wait(timeout=30) == 0
    return services.inference(STAMP, *extra, name=name)


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = str(MB)


# -- row 2: a grant and a commit are ordered ------------------------------------------------------


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_push_whose_writer_is_fenced_while_it_streams_ends_aborted_and_swaps_nothing(
    services: Services, relay: str
) -> None:
    sync = Sync(services.inference(STAMP, "--sync-relay", relay))
    first = sync.acquire("A")
    sync.push(full_push(1, first, "A"))
    state = stamp_state(2)
    payload = payload_of(state)
    half = len(payload) // 2
    go = threading.Event()

    def paused() -> Iterator[bytes]:
        yield header(2, first, "A", len(payload))
        yield data(payload[:half])
        go.wait(30)
        yield data(payload[half:])
        yield commit(state)

    errors: list[grpc.RpcError] = []

    def push_a() -> None:
        try:
            sync.push(paused())
        except grpc.RpcError as error:
            errors.append(error)

    pushing = threading.Thread(target=push_a)
    pushing.start()
    wait_until(lambda: sync.state().HasField("pending"), timeout=20)
    second = sync.acquire("B")
    assert second == first + 1
    go.set()
    pushing.join(30)
    assert len(errors) == 1, "the fenced push was committed"
    assert errors[0].code() is grpc.StatusCode.ABORTED
    assert error_reason(errors[0]) == "fenced"
    assert "carries epoch 1 and is fenced" in (errors[0].details() or "")
    assert_serving(sync, 1, "A", second, "B")
    # The new writer's first push is not refused as "another push is in progress".
    assert sync.push(full_push(2, second, "B")).version == 2
    assert_serving(sync, 2, "B", second, "B")


# -- row 3: a push never moves the lease; epochs and versions are bounded ------------------------


def test_a_push_never_moves_the_lease_and_out_of_range_numbers_are_refused(
    services: Services, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    sync = Sync(services.inference(STAMP, "--state-dir", str(state_dir), name="first"))
    first = sync.acquire("A")
    sync.push(full_push(1, first, "A"))

    error = sync.refused(full_push(1, U64_MAX, "A"))  # stale, and an epoch past the bound
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"writer_epoch {U64_MAX} is out of range" in (error.details() or "")

    unknown = full_push(2, first + 5, "A")
    error = sync.refused(unknown)
    assert error.code() is grpc.StatusCode.ABORTED
    assert error_reason(error) == "unknown-epoch"
    assert "carries epoch 6, newer than the newest granted here (1)" in (error.details() or "")

    for version, base in ((1 << 63, 0), (U64_MAX, (1 << 63) + 1)):
        messages = full_push(2, first, "A")
        messages[0] = header(version, first, "A", 100, base)
        error = sync.refused(messages)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"version {version} is out of range" in (error.details() or "")

    with pytest.raises(grpc.RpcError) as caught:
        sync.stub.Rollback(pb.RollbackRequest(model_name="stamp", to_version=U64_MAX), timeout=20)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"to_version {U64_MAX} is out of range" in (caught.value.details() or "")

    assert_serving(sync, 1, "A", first, "A")  # nothing moved the lease or the weights
    second = sync.acquire("B")
    assert second == first + 1
    listed = sync.stub.ListModels(pb.ListModelsRequest(), timeout=20)
    assert [(m.model_name, m.writer_epoch, m.lease_holder) for m in listed.models] == [
        ("stamp", second, "B")
    ]
    assert lease_file(state_dir) == {"epoch": second, "holder": "B"}

    again = Sync(restart(services, sync.inference, "--state-dir", str(state_dir), name="second"))
    assert_serving(again, 1, "A", second, "B")
    error = again.refused(full_push(2, first, "A"))
    assert error.code() is grpc.StatusCode.ABORTED
    assert error_reason(error) == "fenced"
    assert again.push(full_push(2, second, "B")).version == 2
    assert again.acquire("C") == second + 1


def test_a_lease_file_out_of_range_is_refused_at_start(services: Services, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    folder = state_dir / "models" / "stamp"
    folder.mkdir(parents=True)
    (folder / "writer.json").write_text(json.dumps({"epoch": 1 << 64, "holder": "A"}))
    command = [sys.executable, "-m", "inference_service", "--models", STAMP, "--device", "cpu"]
    command += ["--listen", "127.0.0.1:0", "--sync-listen", "127.0.0.1:0"]
    command += ["--metrics-listen", "off", "--state-dir", str(state_dir)]
    done = subprocess.run(
        command, cwd=ROOT, env=services.env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2  # refused loudly: fencing is not silently reset
    assert f"{folder / 'writer.json'}: epoch {1 << 64} is out of range" in done.stderr
    assert "Traceback" not in done.stderr


# -- row 4: grants are serialized and durable before they are answered --------------------------


def test_concurrent_grants_each_get_an_epoch_and_the_disk_holds_the_last_answer(
    services: Services, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    extra = ("--state-dir", str(state_dir), "--max-concurrent-pushes", "64")
    sync = Sync(services.inference(STAMP, *extra, name="first"))
    writers = [f"w{i}" for i in range(50)]
    start = threading.Barrier(len(writers))

    def acquire(writer: str) -> int | grpc.StatusCode:
        start.wait(30)
        try:
            return sync.acquire(writer)
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(len(writers)) as pool:
        answers = dict(zip(writers, pool.map(acquire, writers), strict=True))
    assert {w: a for w, a in answers.items() if not isinstance(a, int)} == {}
    epochs = {a: w for w, a in answers.items() if isinstance(a, int)}
    assert sorted(epochs) == list(range(1, 51))  # each grant its own epoch
    last = epochs[50]
    state = sync.state()
    assert (state.writer_epoch, state.lease_holder) == (50, last)
    assert lease_file(state_dir) == {"epoch": 50, "holder": last}

    again = Sync(restart(services, sync.inference, *extra, name="second"))
    assert_serving(again, 0, "", 50, last)
    error = again.refused(full_push(1, 49, epochs[49]))
    assert error.code() is grpc.StatusCode.ABORTED
    assert error_reason(error) == "fenced"
    assert again.push(full_push(1, 50, last)).version == 1


def test_a_grant_the_disk_cannot_record_is_unavailable_and_changes_nothing(
    services: Services, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    sync = Sync(services.inference(STAMP, "--state-dir", str(state_dir)))
    first = sync.acquire("A")
    sync.push(full_push(1, first, "A"))
    # The model's folder becomes a file: no write under it can succeed, root or not.
    folder = state_dir / "models" / "stamp"
    away = folder.with_name("stamp.away")
    wait_until(lambda: (folder / f"{1:012d}.safetensors").exists())
    folder.rename(away)
    folder.write_text("not a folder")
    with pytest.raises(grpc.RpcError) as caught:
        sync.acquire("B")
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "could not record the new writer" in (caught.value.details() or "")
    assert_serving(sync, 1, "A", first, "A")
    assert sync.push(full_push(2, first, "A")).version == 2  # A still holds the model

    folder.unlink()
    away.rename(folder)
    second = sync.acquire("B")
    assert second == first + 1
    assert lease_file(state_dir) == {"epoch": second, "holder": "B"}


# -- row 5: a stalled push is ended; a newer writer is not locked out ----------------------------


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_push_that_stalls_is_ended_deadline_exceeded_and_frees_the_model(
    services: Services, relay: str
) -> None:
    services.env["INFERENCE_PUSH_IDLE_TIMEOUT_S"] = "1"
    sync = Sync(services.inference(STAMP, "--sync-relay", relay))
    first = sync.acquire("A")
    sync.push(full_push(1, first, "A"))
    state = stamp_state(2)
    resume = threading.Event()

    def stalled(*messages: bytes) -> Iterator[bytes]:
        yield from messages
        resume.wait(30)

    try:
        after_header = sync.refused(stalled(header(2, first, "A", len(payload_of(state)))))
        assert after_header.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 1s" in (after_header.details() or "")
        assert_serving(sync, 1, "A", first, "A")
        silent = sync.refused(stalled())  # not even a header
        assert silent.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 1s" in (silent.details() or "")
    finally:
        resume.set()
    assert sync.push(full_push(2, first, "A")).version == 2  # the model's push slot is free
    assert_serving(sync, 2, "A", first, "A")
