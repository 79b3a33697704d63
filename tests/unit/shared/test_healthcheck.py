"""The compose health check's exit codes: Docker reads 0 as healthy, 1 as unhealthy and reserves
2, so no failure of the check may exit 2."""

from __future__ import annotations

import pytest

from shared import healthcheck


@pytest.mark.parametrize(
    "argv",
    [[], ["127.0.0.1:1", "--no-such-flag"], ["127.0.0.1:1", "--timeout"]],
    ids=["no-address", "unknown-flag", "flag-without-value"],
)
def test_a_usage_error_exits_1_naming_it(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        healthcheck.main(argv)
    assert exited.value.code == 1
    assert "error:" in capsys.readouterr().err


def test_a_bad_timeout_exits_1(capsys: pytest.CaptureFixture) -> None:
    assert healthcheck.main(["127.0.0.1:1", "--timeout", "soon"]) == 1
    assert "--timeout" in capsys.readouterr().err


def test_a_server_that_does_not_answer_is_unhealthy(capsys: pytest.CaptureFixture) -> None:
    # Port 1 on the loopback: nothing listens there, so the call fails at once.
    assert healthcheck.main(["127.0.0.1:1", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
