"""The trainer's look at what a service applied of a push that left whole (push_watch.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from trainer_service.push_watch import AppliedWatch

HEADER = pb.PushHeader(model_name="m", version=3, base_version=2, writer_id="t", payload_bytes=4096)
BOUND_S = 0.01


def state(applied: int, model: str = "m", version: int = 2) -> pb.ModelState:
    pending = pb.PendingPush(
        writer_id="t", version=3, base_version=2, bytes_received=applied, payload_bytes=4096
    )
    return pb.ModelState(model_name=model, version=version, pending=pending)


class Busy(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "at its limit of lookups; retry later"


def looks(
    answers: list[pb.ModelState | grpc.RpcError],
) -> Iterator[tuple[grpc.StatusCode, str] | None]:
    """What the watch says at each look, a look per answer."""
    given = iter(answers)

    def get_model(bound_s: float) -> pb.ModelState:
        answer = next(given)
        if isinstance(answer, grpc.RpcError):
            raise answer
        return answer

    watch = AppliedWatch(HEADER, get_model, BOUND_S)
    for _ in answers:
        time.sleep(BOUND_S * 2)
        yield watch.stuck(1.0)


def test_a_service_that_applies_nothing_more_between_two_looks_is_stuck() -> None:
    *quiet, verdict = looks([state(100), state(200), state(200)])
    assert quiet == [None, None]
    assert verdict == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "the service applied nothing more of the push for 0.01s (it is stuck)",
    )


@pytest.mark.parametrize(
    "answers",
    [
        [state(100), Busy(), state(200), Busy(), state(300)],  # busy looks say nothing
        [state(100), state(4096), state(4096)],  # whole: it commits, no more looks
        [state(100), state(0, version=3), state(0, version=3)],  # it serves the version
    ],
    ids=["busy", "whole", "committed"],
)
def test_a_service_that_goes_on_or_is_busy_is_not_stuck(
    answers: list[pb.ModelState | grpc.RpcError],
) -> None:
    assert list(looks(answers)) == [None] * len(answers)


def test_a_look_at_another_model_is_no_progress_on_this_push() -> None:
    *_, verdict = looks([state(100, model="other"), state(200, model="other")])
    assert verdict is not None and verdict[0] == grpc.StatusCode.DEADLINE_EXCEEDED
