"""Certificates for tests that serve TLS: CAs, and certificates they sign, made with openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path

# Server certificates name this host (and 127.0.0.1): tools reach `localhost` by telling TLS the
# name to expect.
SERVER_NAME = "weightsync.test"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _new_key(name: str, directory: Path) -> list[str]:
    return [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(directory / f"{name}.key"),
    ]


def make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA `<name>.pem` (key `<name>.key`) in `directory`; returns the PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / f"{name}.pem"
    openssl("req", "-x509", *_new_key(name, directory), "-days", "1", "-out", str(pem))
    return pem


def make_cert(directory: Path, name: str, ca: Path, san: str = "") -> tuple[Path, Path]:
    """A certificate `<name>.pem` and key `<name>.key` signed by `ca` (made by `make_ca`),
    with `san` as its subjectAltName when given; returns (certificate, key)."""
    csr = directory / f"{name}.csr"
    openssl("req", *_new_key(name, directory), "-out", str(csr))
    extra: list[str] = []
    if san:
        ext = directory / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", str(ext)]
    pem = directory / f"{name}.pem"
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca.with_suffix(".key")),
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        str(pem),
        *extra,
    )
    return pem, directory / f"{name}.key"


def make_server_cert(directory: Path, ca: Path) -> tuple[Path, Path]:
    """A server certificate for SERVER_NAME and 127.0.0.1, signed by `ca`."""
    return make_cert(directory, "server", ca, f"DNS:{SERVER_NAME},IP:127.0.0.1")


def make_pki(directory: Path) -> Path:
    """`directory` with a CA (`ca.pem`), a server certificate (`make_server_cert`) and a client
    certificate (`client.pem`, `client.key`), both signed by it."""
    ca = make_ca(directory, "ca")
    make_server_cert(directory, ca)
    make_cert(directory, "client", ca)
    return directory
