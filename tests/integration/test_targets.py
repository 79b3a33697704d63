"""The trainer's targets: TLS verifies the name the user gave at every address it resolves to;
an unreachable target lags, never holds the others back, and is caught up when it returns."""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.weights.digest import state_digest
from tests.integration.apps import Stamp
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.pki import make_ca, make_cert
from tests.integration.test_forwarding import free_ports

STAMP = "tests.integration.apps:stamp"
# Nothing listens there and nothing routes to it (TEST-NET-1, RFC 5737): a dead, non-loopback
# target.
UNROUTABLE = "192.0.2.1:8101"


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


def stamp_digest(run: int) -> bytes:
    """The digest of the stamp model after trainer run `run` (0: as initialised)."""
    module = Stamp(1)
    with torch.no_grad():
        for part in module.parts:
            part.fill_(float(run))
    return state_digest(module.state_dict())


@pytest.fixture
def localhost_pki(tmp_path: Path) -> Path:
    """A CA and a server certificate it signed for the name `localhost` only (no IP SAN)."""
    directory = tmp_path / "pki"
    ca = make_ca(directory, "ca")
    make_cert(directory, "server", ca, "DNS:localhost")
    return directory


def tls_model_state(inference: Inference, pki: Path) -> pb.ModelState:
    """GetModel over TLS, verifying the service as `localhost`."""
    port = inference.sync.rsplit(":", 1)[1]
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = pb_grpc.WeightSyncStub(channel)
        state: pb.ModelState = stub.GetModel(pb.GetModelRequest(model_name="stamp"), timeout=10)
        return state


def trainer_metrics(services: Services, name: str) -> str:
    port = re.search(r"metrics on port (\d+)", services.log(name))
    assert port, services.log(name)
    url = f"http://127.0.0.1:{port.group(1)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def target_gauge(text: str, metric: str, target: str) -> float | None:
    found = re.search(
        rf'weightsync_trainer_target_{metric}\{{model="stamp",target="{re.escape(target)}"\}} '
        r"(\S+)",
        text,
    )
    return float(found.group(1)) if found else None


def test_tls_verifies_the_name_given_not_the_address_it_resolves_to(
    services: Services, localhost_pki: Path
) -> None:
    services.env.update(
        INFERENCE_TLS_CERT=str(localhost_pki / "server.pem"),
        INFERENCE_TLS_KEY=str(localhost_pki / "server.key"),
    )
    inference = services.inference(STAMP)
    port = inference.sync.rsplit(":", 1)[1]
    services.env["TRAINER_TLS_CA"] = str(localhost_pki / "ca.pem")
    trainer = services.trainer(
        STAMP, [inference], "--inference", f"localhost:{port}", "--max-runs", "1"
    )
    assert trainer.wait(timeout=30) == 0, services.log("trainer")
    state = tls_model_state(inference, localhost_pki)
    assert (state.version, state.digest) == (2, stamp_digest(1))  # the catch-up, then one run

    # An address is verified as given: the certificate names no IP, so 127.0.0.1 fails.
    by_ip = services.trainer(
        STAMP,
        [inference],
        "--inference",
        f"127.0.0.1:{port}",
        "--connect-timeout",
        "1",
        name="by-ip",
    )
    wait_until(lambda: "initial sync failed" in services.log("by-ip"), timeout=30)
    by_ip.kill()
    by_ip.wait()
    assert "UNAVAILABLE" in services.log("by-ip") or "DEADLINE_EXCEEDED" in services.log("by-ip")
    assert tls_model_state(inference, localhost_pki).version == 2


def test_a_dead_target_lags_while_the_live_one_is_fed_and_is_caught_up_when_it_returns(
    services: Services,
) -> None:
    live = services.inference(STAMP, name="live")
    gone = services.inference(STAMP, name="gone")
    gone.process.send_signal(signal.SIGTERM)
    assert gone.process.wait(timeout=30) == 0
    # One run, then a long wait before the next: the returning target can only be caught up
    # in the background, not by a later sync.
    trainer = services.trainer(
        STAMP, [live, gone], "--run-interval", "600", "--max-runs", "2", "--connect-timeout", "1"
    )
    wait_until(lambda: live.model_state("stamp").version == 2, timeout=30)
    assert live.model_state("stamp").digest == stamp_digest(1)
    log = services.log("trainer")
    assert f"{gone.sync} is unreachable" in log, log
    text = trainer_metrics(services, "trainer")
    assert target_gauge(text, "lagging", gone.sync) == 1.0
    assert target_gauge(text, "lagging", live.sync) == 0.0
    assert target_gauge(text, "version", live.sync) == 2.0

    back = services.inference(STAMP, "--sync-listen", gone.sync, name="back")
    wait_until(lambda: back.model_state("stamp").version == 2, timeout=30)
    assert back.model_state("stamp").digest == stamp_digest(1)
    wait_until(lambda: f"{gone.sync} caught up" in services.log("trainer"), timeout=10)
    text = trainer_metrics(services, "trainer")
    assert target_gauge(text, "lagging", gone.sync) == 0.0
    assert target_gauge(text, "version", gone.sync) == 2.0
    assert trainer.poll() is None  # still waiting out its run interval: no sync did this
    assert live.model_state("stamp").version == 2


def test_a_token_sent_in_plaintext_beyond_loopback_is_warned_of_once_per_target(
    services: Services,
) -> None:
    services.env.update(INFERENCE_SYNC_TOKEN="sync-secret", TRAINER_SYNC_TOKEN="sync-secret")
    live = services.inference(STAMP)
    trainer = services.trainer(
        STAMP,
        [live],
        "--inference",
        f"{live.sync},{UNROUTABLE}",
        "--max-runs",
        "2",
        "--connect-timeout",
        "1",
    )
    assert trainer.wait(timeout=30) == 0, services.log("trainer")
    assert live.model_state("stamp", token="sync-secret").version == 3
    warnings = [
        line
        for line in services.log("trainer").splitlines()
        if "WARNING" in line and "plaintext" in line
    ]
    assert len(warnings) == 1, services.log("trainer")
    assert UNROUTABLE in warnings[0] and "--tls-ca" in warnings[0]


def test_one_service_listed_under_two_addresses_is_fed_once_and_training_goes_on(
    services: Services,
) -> None:
    # The sync plane listens on every local address: 127.0.0.1 and 127.0.0.2 reach the same
    # service. Both are listed, as a user who names a service and its address might.
    [port] = free_ports(1)
    inference = services.inference(
        STAMP, "--sync-listen", f"0.0.0.0:{port}", "--allow-open-sync", name="inference"
    )
    first, second = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
    trainer = services.start_trainer(
        STAMP,
        [first, second],
        *("--trainer-id", "trainer", "--max-runs", "2", "--run-interval", "0"),
        name="trainer",
    )
    assert trainer.wait(timeout=60) == 0, services.log("trainer")
    log = services.log("trainer")
    # Its two writer leases would have fenced each other: the trainer took the second for
    # another trainer and stopped.
    assert "another trainer has taken it over" not in log
    assert f"{first} and {second} reach the same inference service" in log
    assert f"it is fed once, through {first}" in log  # the first listed
    assert "version 3 committed on 1 inference service(s)" in log
    state = inference.model_state("stamp")
    assert (state.version, state.digest, state.writer_id) == (3, stamp_digest(2), "trainer")
    assert state.instance_id


def test_an_address_once_reaching_a_listed_service_is_fed_when_another_replica_takes_it(
    services: Services,
) -> None:
    # 127.0.0.1 and 127.0.0.2 first reach one service (it listens on every local address):
    # the second is fed through the first. Then that service goes, and two replicas take the
    # two addresses: the second address must be fed on its own, not skipped for good.
    [port] = free_ports(1)
    first, second = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
    both = services.inference(
        STAMP, "--sync-listen", f"0.0.0.0:{port}", "--allow-open-sync", name="both"
    )
    trainer = services.start_trainer(
        STAMP,
        [first, second],
        *("--trainer-id", "trainer", "--run-interval", "0.3", "--connect-timeout", "1"),
        name="trainer",
    )
    wait_until(lambda: "reach the same inference service" in services.log("trainer"))
    both.process.send_signal(signal.SIGTERM)
    assert both.process.wait(timeout=30) == 0
    for name, address in (("one", first), ("two", second)):
        services.inference(STAMP, "--sync-listen", address, "--allow-open-sync", name=name)

    def state(address: str) -> pb.ModelState:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.WeightSyncStub(channel)
            found: pb.ModelState = stub.GetModel(pb.GetModelRequest(model_name="stamp"), timeout=10)
            return found

    assert state(first).instance_id != state(second).instance_id
    wait_until(lambda: state(second).version > 0, timeout=60)
    wait_until(lambda: state(first).version > 0, timeout=60)
    log = services.log("trainer")
    assert f"{second} no longer reaches the inference service {first} feeds" in log, log
    assert "another trainer has taken it over" not in log
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0, services.log("trainer")
    for address in (first, second):  # each holds a whole version the trainer made
        served = state(address)
        # (run v - 1 as a rule; an earlier one where a sync failed under load and its number
        # went unused)
        made = {stamp_digest(run) for run in range(served.version)}
        assert served.digest in made, served


def test_a_replica_back_with_a_newer_version_than_a_restarted_trainer_has_is_fed_above_it(
    services: Services,
) -> None:
    # A first trainer takes one replica to version 13 (its state on disk). While that replica
    # is away, a second trainer starts fresh against a new replica (numbering from 1) and the
    # first one's address: when it returns serving 13, a version numbered 13 or below would be
    # refused there, so the second trainer's next sync must be numbered above 13.
    state_dir = services.directory / "returning-state"
    away = services.inference(STAMP, "--state-dir", str(state_dir), name="away")
    first = services.trainer(STAMP, [away], "--max-runs", "12", "--run-interval", "0", name="first")
    assert first.wait(timeout=60) == 0, services.log("first")
    assert away.model_state("stamp").version == 13
    away.process.send_signal(signal.SIGTERM)
    assert away.process.wait(timeout=30) == 0
    fresh = services.inference(STAMP, name="fresh")
    second = services.trainer(
        STAMP,
        [fresh, away],
        *("--max-runs", "10", "--run-interval", "1.5", "--connect-timeout", "1"),
        name="second",
    )
    wait_until(lambda: fresh.model_state("stamp").version >= 2, timeout=30)
    back = services.inference(
        STAMP, "--state-dir", str(state_dir), "--sync-listen", away.sync, name="back"
    )
    assert back.model_state("stamp").version == 13  # restored: the first trainer's
    wait_until(lambda: back.model_state("stamp").writer_id == "second", timeout=60)
    assert second.wait(timeout=60) == 0, services.log("second")
    served = [back.model_state("stamp"), fresh.model_state("stamp")]
    assert served[0].version > 13
    assert (served[0].version, served[0].digest) == (served[1].version, served[1].digest)
    assert f"{away.sync}: it serves version 13, newer than this trainer's" in services.log("second")
