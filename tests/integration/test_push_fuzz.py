"""Seeded bit flips in live pushes, through the sync relay: every push either commits exactly the
state it meant to or is refused with a clear status, and a refused push leaves the served weights
as they were (same version, same digest)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import grpc
import pytest

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.integration.catalogue import Bench, serving_bench

REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,  # not protobuf, bad header or table, digest mismatch
    grpc.StatusCode.NOT_FOUND,  # a flipped model name
    grpc.StatusCode.FAILED_PRECONDITION,  # a flipped base version, the inference-only model
    grpc.StatusCode.ABORTED,  # a flipped version or epoch: stale, fenced or unknown epoch
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a flipped size over the service's limits
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    yield from serving_bench(tmp_path_factory.mktemp("fuzz"))


def flipped(message: bytes, rng: random.Random, within: int) -> bytes:
    out = bytearray(message)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(min(within, len(out)))] ^= 1 << rng.randrange(8)
    return bytes(out)


def test_flipped_bits_in_pushes_commit_whole_or_change_nothing(bench: Bench) -> None:
    rng = random.Random(20261126)
    payload = bench.payload()
    half = len(payload) // 2
    outcomes: dict[str, int] = {}
    for _ in range(120):
        # A fresh lease each time: the epoch each push carries is the current one, so only the
        # flips decide the outcome (a flipped epoch is fenced or unknown, never adopted).
        lease = bench.inference.sync_stub().AcquireWriter(
            pb.AcquireWriterRequest(model_name="stamp", writer_id="catalogue"), timeout=10
        )
        bench.epoch = lease.epoch
        served = bench.inference.model_state("stamp")
        messages = [
            bench.header(version=served.version + 1),
            bench.data_msg(payload[:half]),
            bench.data_msg(payload[half:]),
            bench.commit(bench.good_digest()),
        ]
        which = rng.randrange(len(messages))
        # data messages: half the time in the safetensors header's first 4 KiB
        within = 4096 if which in (1, 2) and rng.random() < 0.5 else len(messages[which])
        messages[which] = flipped(messages[which], rng, within)
        try:
            bench.push_raw(iter(messages), timeout=30)
        except grpc.RpcError as error:
            assert error.code() in REFUSALS, (error.code(), error.details())
            assert error.details()
            now = bench.inference.model_state("stamp")
            assert (now.version, now.digest) == (served.version, served.digest)
            outcomes[error.code().name] = outcomes.get(error.code().name, 0) + 1
        else:
            # Only a flip the push survives whole (a header field such as the writer id) may
            # commit, and then it committed exactly the state the commit's digest names.
            assert which == 0
            assert bench.inference.model_state("stamp").digest == bench.good_digest()
            outcomes["OK"] = outcomes.get("OK", 0) + 1
    assert outcomes.get("INVALID_ARGUMENT", 0) >= 60, outcomes
    assert bench.inference.process.poll() is None
    assert "Traceback" not in bench.inference.log.read_text()
