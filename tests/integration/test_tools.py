"""The operator's tools speak to every deployment README documents: `weightsync-admin` and
`python -m shared.healthcheck`, run as a user runs them, against services guarded by tokens,
serving TLS, and requiring client certificates (mutual TLS)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.grpc.auth import TlsFiles
from shared.grpc.channel import open_channel
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES
from shared.weights.digest import state_digest
from tests.integration.conftest import ROOT, Inference, Services
from tests.integration.pki import SERVER_NAME
from tests.integration.stamp_writer import StampWriter, stamp_state

STAMP = "tests.integration.apps:stamp"
MB = 1
SYNC_TOKEN = "sync-secret"
DATA_TOKEN = "data-secret"
ADMIN = str(Path(sys.executable).parent / "weightsync-admin")
# What a tool run may find in the environment: nothing of the services' own settings.
SERVICE_ENV = (
    "INFERENCE_SYNC_TOKEN",
    "INFERENCE_DATA_TOKEN",
    "INFERENCE_TLS_CERT",
    "INFERENCE_TLS_KEY",
    "INFERENCE_TLS_CLIENT_CA",
)


def tool(services: Services, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in services.env.items() if k not in SERVICE_ENV}
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
        timeout=60,
    )


def admin(services: Services, inference: Inference, *args: str, **env: str) -> str:
    """Run weightsync-admin against `inference`'s sync plane; return what it printed."""
    done = tool(services, ADMIN, "--sync", inference.sync, *args, **env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def healthcheck(services: Services, address: str, *args: str, **env: str) -> int:
    done = tool(services, sys.executable, "-m", "shared.healthcheck", address, *args, **env)
    assert "Traceback" not in done.stderr
    return done.returncode


def test_admin_with_the_sync_token(services: Services, tmp_path: Path) -> None:
    services.env.update(
        INFERENCE_SYNC_TOKEN=SYNC_TOKEN, INFERENCE_DATA_TOKEN=DATA_TOKEN, TEST_STAMP_MB=str(MB)
    )
    inference = services.inference(STAMP, "--state-dir", str(tmp_path / "state"))
    empty = admin(services, inference, "versions", "stamp", INFERENCE_SYNC_TOKEN=SYNC_TOKEN)
    assert empty == "stamp: no versions kept on disk (serving version 0)\n"
    writer = StampWriter(open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, token=SYNC_TOKEN), MB)
    writer.acquire()
    first = writer.push(1.0, 1)
    writer.push(2.0, 2)

    refused = tool(services, ADMIN, "--sync", inference.sync, "models")
    assert refused.returncode == 1
    assert refused.stderr.startswith("UNAUTHENTICATED: missing bearer token for the sync plane")

    # The token from each place a user would put it: the service's variable, the trainer's, a flag.
    models = admin(services, inference, "models", INFERENCE_SYNC_TOKEN=SYNC_TOKEN)
    assert models.startswith("stamp\tversion 2\ttests\taccepts pushes")
    versions = admin(services, inference, "versions", "stamp", TRAINER_SYNC_TOKEN=SYNC_TOKEN)
    assert [line.split("\t")[0] for line in versions.splitlines()] == ["* 2", "  1"]  # newest first
    rolled = admin(services, inference, "--token", SYNC_TOKEN, "rollback", "stamp", "--to", "1")
    assert rolled == "stamp: now serving version 3 (rollback to 1 of tests)\n"
    served = inference.model_state("stamp", token=SYNC_TOKEN)
    assert (served.version, served.digest) == (3, first)  # version 1's weights, bit for bit
    assert first == state_digest(stamp_state(MB, 1.0))

    # Health needs no token on either plane; the data plane's token, sent, changes nothing.
    assert healthcheck(services, inference.data) == 0
    assert healthcheck(services, inference.sync) == 0
    assert healthcheck(services, inference.data, INFERENCE_DATA_TOKEN=DATA_TOKEN) == 0
    unknown = tool(
        services, sys.executable, "-m", "shared.healthcheck", inference.data, "--service", "nope"
    )
    assert (unknown.returncode, unknown.stderr) == (
        1,
        f"{inference.data}: NOT_FOUND: unknown service 'nope'\n",
    )


def test_tools_over_tls(services: Services, pki: Path) -> None:
    services.env.update(
        INFERENCE_SYNC_TOKEN=SYNC_TOKEN,
        INFERENCE_TLS_CERT=str(pki / "server.pem"),
        INFERENCE_TLS_KEY=str(pki / "server.key"),
        TEST_STAMP_MB=str(MB),
    )
    inference = services.inference(STAMP)
    ca = str(pki / "ca.pem")

    assert healthcheck(services, inference.data) == 1  # plaintext against TLS
    assert healthcheck(services, inference.data, "--tls-ca", ca) == 0
    assert healthcheck(services, inference.sync, HEALTHCHECK_TLS_CA=ca) == 0
    # By a name the certificate does not carry, unless told the name it carries.
    localhost = inference.data.replace("127.0.0.1", "localhost")
    assert healthcheck(services, localhost, "--tls-ca", ca) == 1
    assert healthcheck(services, localhost, "--tls-ca", ca, "--tls-server-name", SERVER_NAME) == 0

    models = admin(
        services, inference, "models", INFERENCE_SYNC_TOKEN=SYNC_TOKEN, TRAINER_TLS_CA=ca
    )
    assert models.startswith("stamp\tversion 0\t")


def test_tools_over_mutual_tls(services: Services, pki: Path) -> None:
    services.env.update(
        INFERENCE_SYNC_TOKEN=SYNC_TOKEN,
        INFERENCE_TLS_CERT=str(pki / "server.pem"),
        INFERENCE_TLS_KEY=str(pki / "server.key"),
        INFERENCE_TLS_CLIENT_CA=str(pki / "ca.pem"),
        TEST_STAMP_MB=str(MB),
    )
    inference = services.inference(STAMP)
    ca, cert, key = (str(pki / name) for name in ("ca.pem", "client.pem", "client.key"))

    assert healthcheck(services, inference.data, "--tls-ca", ca) == 1  # no client certificate
    for address in (inference.data, inference.sync):
        flags = ("--tls-ca", ca, "--tls-cert", cert, "--tls-key", key)
        assert healthcheck(services, address, *flags) == 0
        assert (
            healthcheck(
                services,
                address,
                HEALTHCHECK_TLS_CA=ca,
                HEALTHCHECK_TLS_CERT=cert,
                HEALTHCHECK_TLS_KEY=key,
            )
            == 0
        )

    client = TlsFiles(Path(cert), Path(key), Path(ca))
    channel = open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, token=SYNC_TOKEN, tls=client)
    writer = StampWriter(channel, MB)
    writer.acquire()
    writer.push(5.0, 1)
    models = admin(
        services,
        inference,
        "models",
        TRAINER_SYNC_TOKEN=SYNC_TOKEN,
        TRAINER_TLS_CA=ca,
        TRAINER_TLS_CERT=cert,
        TRAINER_TLS_KEY=key,
    )
    assert models.startswith("stamp\tversion 1\ttests\taccepts pushes")
