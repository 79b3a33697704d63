"""Where the trainer's targets are: names resolved to every address, the name kept for TLS."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared.grpc.auth import TlsFiles
from trainer_service.names import Endpoint, is_loopback, resolve, warn_plaintext_token


def test_a_name_resolves_to_its_addresses_and_is_kept_for_tls_an_address_is_not() -> None:
    assert resolve(["localhost:8101"]) == [Endpoint("127.0.0.1:8101", "localhost")]
    assert resolve(["127.0.0.1:8101", "[::1]:8102"]) == [
        Endpoint("127.0.0.1:8101", None),
        Endpoint("[::1]:8102", None),
    ]
    # One address named twice is dialled once, under the first name it was given.
    assert resolve(["127.0.0.1:8101", "localhost:8101"]) == [Endpoint("127.0.0.1:8101", None)]
    assert resolve(["no-such-host.invalid:8101"]) == []


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:8101", True),
        ("[::1]:8101", True),
        ("localhost:8101", True),
        ("192.0.2.1:8101", False),
        ("no-such-host.invalid:8101", False),  # unknown: assume the network
    ],
)
def test_is_loopback(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


def plaintext_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_token_in_plaintext_beyond_loopback_is_warned_of_once_per_target(
    caplog: pytest.LogCaptureFixture,
) -> None:
    targets = ["127.0.0.1:8101", "192.0.2.1:8101", "192.0.2.2:8101"]
    with caplog.at_level(logging.WARNING, logger="trainer_service.targets"):
        warn_plaintext_token(targets, "secret", None)
    warnings = plaintext_warnings(caplog)
    assert len(warnings) == 2
    for target, warning in zip(targets[1:], warnings, strict=True):
        assert f"the sync token goes to {target} in plaintext" in warning
        assert "Give --tls-ca (TRAINER_TLS_CA)" in warning


def test_no_warning_without_a_token_or_over_tls(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer_service.targets"):
        warn_plaintext_token(["192.0.2.1:8101"], None, None)
        warn_plaintext_token(["192.0.2.1:8101"], "secret", TlsFiles(ca=Path("ca.pem")))
    assert plaintext_warnings(caplog) == []
