"""The one table from domain errors to status code, wire reason and message."""

from __future__ import annotations

import inspect
import logging

import grpc
import pytest

from shared import errors, protocol
from shared.grpc.errors import ERRORS, INTERNAL, Status, failure, status_of

# The reasons on the wire: clients act on them, so none may change with a class's name.
WIRE = {
    errors.MalformedPushError: "malformed-push",
    errors.BaseVersionMismatchError: "base-version-mismatch",
    errors.FencedError: "fenced",
    errors.UnknownEpochError: "unknown-epoch",
    errors.PushStalledError: "push-stalled",
    errors.ModelNotFoundError: "model-not-found",
    errors.VersionNotServedError: "version-not-served",
    errors.InferenceOnlyModelError: "inference-only-model",
    errors.ResourceLimitError: "resource-limit",
    errors.MalformedBatchError: "malformed-batch",
    errors.BufferNotFoundError: "buffer-not-found",
}


def domain_errors() -> list[type[errors.ServiceError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ServiceError)
    ]


def test_every_domain_error_has_its_own_entry_and_reason() -> None:
    assert set(ERRORS) == set(domain_errors())
    reasons = [reason for _, reason in ERRORS.values()]
    assert len(set(reasons)) == len(reasons)
    constants = {
        v
        for k, v in vars(protocol).items()
        if k.isupper() and isinstance(v, str) and k != "REASON_KEY"
    }
    assert set(reasons) == constants
    for cls, reason in WIRE.items():
        assert ERRORS[cls][1] == reason


def test_a_status_is_found_along_the_class_hierarchy() -> None:
    class OtherFencedError(errors.FencedError):
        pass

    assert status_of(OtherFencedError("model 'm' is written by 'b'")) == Status(
        grpc.StatusCode.ABORTED, protocol.FENCED, "model 'm' is written by 'b'"
    )
    assert status_of(errors.BaseVersionMismatchError("push in full")) == Status(
        grpc.StatusCode.FAILED_PRECONDITION, protocol.BASE_VERSION_MISMATCH, "push in full"
    )


def test_a_domain_error_is_told_and_a_bug_is_logged_but_not_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shared.grpc.errors")
    status = failure(errors.PushStalledError("sent nothing for 5s"), "Sync.Push")
    assert status == Status(
        grpc.StatusCode.DEADLINE_EXCEEDED, "push-stalled", "sent nothing for 5s"
    )
    assert "Sync.Push -> DEADLINE_EXCEEDED: sent nothing for 5s" in caplog.text
    try:
        raise KeyError("secret internals")
    except KeyError as bug:
        status = failure(bug, "Sync.Push")
    assert status == INTERNAL
    assert status.reason == "" and "secret" not in status.message
    record = caplog.records[-1]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "unhandled error in Sync.Push" in record.getMessage()
