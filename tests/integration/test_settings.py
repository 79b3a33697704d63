"""Settings end to end: a size written with a unit reaches the push receiver, and a bad
process-wide knob stops a service at start with exit status 2 and a message naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import safetensors.torch

from tests.integration.apps import MLP
from tests.integration.catalogue import MB, Bench, assert_untouched
from tests.integration.conftest import ROOT, Services

CATALOGUE = "tests.integration.apps:catalogue"


def test_a_size_with_a_unit_in_the_environment_bounds_pushes(
    services: Services, tmp_path: Path
) -> None:
    pretrained = tmp_path / "frozen.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    services.env["TEST_PRETRAINED"] = str(pretrained)
    services.env["TEST_STAMP_MB"] = str(MB)
    services.env["INFERENCE_MAX_PUSH_BYTES"] = "2MiB"
    bench = Bench(services.inference(CATALOGUE))  # version 1: a 1 MiB push, within the bound
    with pytest.raises(grpc.RpcError) as caught:
        bench.push_raw(iter([bench.header(payload_bytes=(2 << 20) + 1)]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the 2097152-byte limit" in caught.value.details()
    assert_untouched(bench)


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        (
            "inference_service",
            ["--listen", "127.0.0.1:0", "--sync-listen", "127.0.0.1:0", "--sync-relay", "off"],
        ),
        ("trainer_service", ["--inference", "127.0.0.1:1", "--max-runs", "1"]),
    ],
)
def test_a_bad_process_wide_knob_stops_the_service_at_start(
    services: Services, module: str, flags: list[str]
) -> None:
    """WEIGHTSYNC_PREFETCH used to be read deep inside, anything but 1 or 0 meaning auto."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            "--models",
            "tests.integration.apps:stamp",
            "--metrics-listen",
            "off",
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**services.env, "WEIGHTSYNC_PREFETCH": "sometimes"},
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "WEIGHTSYNC_PREFETCH: 'sometimes' is not auto, true (1) or false (0)" in done.stderr
