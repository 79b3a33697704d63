"""One way to open a client channel to either service: plaintext, TLS or mutual TLS, a bearer
token on every call, and message-size limits set explicitly.

Command-line tools declare the same client options through `add_options` and open their channel
with `from_options`, so each of them speaks to any deployment the services can be run as.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from shared.errors import ConfigurationError
from shared.grpc.auth import TlsFiles, bearer
from shared.grpc.options import channel_options


def open_channel(
    target: str,
    max_message_bytes: int,
    *,
    token: str | None = None,
    tls: TlsFiles | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to `target` (HOST:PORT).

    `tls` None: plaintext. Otherwise TLS, verifying the server against `tls.ca` (the system's
    CAs without one), and presenting `tls.cert` and `tls.key` when given (mutual TLS).
    `server_name`: the name the server's certificate must carry, when `target` names it
    otherwise (an IP address, a tunnel). `token` travels as `authorization: Bearer` metadata
    on every call."""
    options: list[tuple[str, Any]] = list(channel_options(max_message_bytes))
    if tls is None:
        if server_name:
            raise ConfigurationError("a TLS server name needs TLS: give a CA file or --tls")
        channel = grpc.insecure_channel(target, options=options)
    else:
        if (tls.cert is None) != (tls.key is None):
            raise ConfigurationError("mutual TLS needs both a client certificate and its key")
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        try:
            credentials = tls.channel_credentials()
        except OSError as exc:
            raise ConfigurationError(f"cannot read a TLS file: {exc}") from None
        channel = grpc.secure_channel(target, credentials, options=options)
    if token:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    return channel


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer(token)

    def _with_token(self, details: grpc.ClientCallDetails) -> _Details:
        metadata = [
            (key, value)
            for key, value in (details.metadata or ())
            if key != "authorization"  # a token given with the call gives way to ours
        ]
        return _Details(
            details.method,
            details.timeout,
            [*metadata, *self._metadata],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        requests: Iterator[Any],
    ) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        requests: Iterator[Any],
    ) -> Any:
        return continuation(self._with_token(details), requests)


def add_options(parser: argparse.ArgumentParser, token_env: Sequence[str], tls_env: str) -> None:
    """The client options of a command-line tool: `--token` (also read from the environment
    variables `token_env`, the first one set), and `--tls`, `--tls-ca`, `--tls-cert`,
    `--tls-key`, `--tls-server-name` (also read from `<tls_env>_TLS_CA` and so on)."""
    names = " or ".join(token_env)
    parser.add_argument(
        "--token",
        default=next((os.environ[name] for name in token_env if os.environ.get(name)), None),
        help=f"bearer token the service requires (env {names}; prefer the environment: "
        "flags show in `ps`)",
    )

    def path_option(flag: str, what: str) -> None:
        env = f"{tls_env}_{flag.removeprefix('--').replace('-', '_').upper()}"
        parser.add_argument(
            flag, type=Path, default=os.environ.get(env) or None, help=f"{what} (env {env})"
        )

    parser.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the service against the system's CAs "
        "(implied by --tls-ca and --tls-cert)",
    )
    path_option("--tls-ca", "PEM CA: connect over TLS, verifying the service against it")
    path_option("--tls-cert", "PEM client certificate, for services that require mutual TLS")
    path_option("--tls-key", "PEM private key of --tls-cert")
    server_name_env = f"{tls_env}_TLS_SERVER_NAME"
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get(server_name_env) or None,
        help="the host name the service's certificate carries, when the address names it "
        f"otherwise (an IP address) (env {server_name_env})",
    )


def from_options(args: argparse.Namespace, target: str, max_message_bytes: int) -> grpc.Channel:
    """The channel that the options `add_options` declared ask for."""
    files = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    secure = args.tls or files.enabled or files.key is not None
    return open_channel(
        target,
        max_message_bytes,
        token=args.token,
        tls=files if secure else None,
        server_name=args.tls_server_name,
    )
