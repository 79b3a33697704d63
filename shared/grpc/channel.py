"""The one way to open a client channel to either service: plaintext, TLS or mutual TLS (verifying
the name the user gave), a bearer token and a default deadline on every call, and message-size
limits set explicitly. The trainer's push client, `InferenceClient`, the sync relay,
`weightsync-admin` and the health check all open theirs here.

Command-line tools declare the same client options through `add_options` and open their channel
with `from_options`, so each of them speaks to any deployment the services can be run as.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from shared.errors import ConfigurationError
from shared.grpc.auth import TlsFiles, bearer, checked_token
from shared.grpc.options import channel_options


def open_channel(
    target: str,
    max_message_bytes: int,
    *,
    token: str | None = None,
    tls: TlsFiles | None = None,
    server_name: str | None = None,
    options: Sequence[tuple[str, int | str]] = (),
    deadline_s: float | None = None,
    max_answer_bytes: int | None = None,
) -> grpc.Channel:
    """A channel to `target` (HOST:PORT, or any address gRPC dials: `unix:PATH`).

    `tls` None: plaintext. Otherwise TLS, verifying the server against `tls.ca` (the system's
    CAs without one), and presenting `tls.cert` and `tls.key` when given (mutual TLS).
    `server_name`: the name the server's certificate must carry, when `target` names it
    otherwise (an IP address it was resolved to, a tunnel); calls carry it as their authority,
    as they would dialling that name. `token` travels as `authorization: Bearer` metadata on
    every call. `options`: channel arguments besides the message-size limits and keepalive of
    `channel_options` (which they override where they name the same). `deadline_s`: calls that
    set no timeout of their own end after that many seconds. `max_answer_bytes`: the largest
    message taken from the server, where that differs from `max_message_bytes`."""
    merged: dict[str, Any] = dict(channel_options(max_message_bytes, max_answer_bytes))
    merged.update(options)
    if tls is None:
        if server_name:
            raise ConfigurationError("a TLS server name needs TLS: give a CA file or --tls")
        channel = grpc.insecure_channel(target, options=list(merged.items()))
    else:
        if server_name:
            merged["grpc.ssl_target_name_override"] = server_name
            merged["grpc.default_authority"] = server_name
        credentials = tls.channel_credentials()  # ConfigurationError for a bad file or pair
        channel = grpc.secure_channel(target, credentials, options=list(merged.items()))
    if token or deadline_s is not None:
        channel = grpc.intercept_channel(channel, CallDefaults(token, deadline_s))
    return channel


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class CallDefaults(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """What every call carries: `authorization: Bearer <token>` in its metadata (with a token),
    and a timeout of `deadline_s` when it sets none (with a deadline)."""

    def __init__(self, token: str | None, deadline_s: float | None = None) -> None:
        self._metadata = bearer(token)
        self._deadline_s = deadline_s

    def _with_defaults(self, details: grpc.ClientCallDetails) -> _Details:
        metadata = details.metadata
        if self._metadata:
            metadata = [
                *(
                    (key, value)
                    for key, value in (metadata or ())
                    if key != "authorization"  # a token given with the call gives way to ours
                ),
                *self._metadata,
            ]
        return _Details(
            details.method,
            self._deadline_s if details.timeout is None else details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def _continue(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        """Any kind of call: `request` is its request, or the iterator of its requests."""
        return continuation(self._with_defaults(details), request)

    intercept_unary_unary = _continue
    intercept_unary_stream = _continue
    intercept_stream_unary = _continue
    intercept_stream_stream = _continue


POLLER_EXIT_S = 5.0  # grpcio's poller looks every 0.2 s


def close_watched(
    channel: grpc.Channel, callback: Callable[[grpc.ChannelConnectivity], None]
) -> None:
    """Unsubscribe `callback` from `channel`, then close it once grpcio's connectivity poller
    has let go of it (for up to a few seconds). That poller checks for callbacks and then
    watches the channel again; a close between the two raises "Cannot monitor channel state:
    Channel closed!" in its thread. Blocks: call it off any path that waits."""
    channel.unsubscribe(callback)
    state = getattr(channel, "_connectivity_state", None)  # grpcio's; absent elsewhere
    gone = time.monotonic() + POLLER_EXIT_S
    while getattr(state, "polling", False) and time.monotonic() < gone:
        time.sleep(0.05)
    channel.close()


def add_options(parser: argparse.ArgumentParser, token_env: Sequence[str], tls_env: str) -> None:
    """The client options of a command-line tool: `--token` (also read from the environment
    variables `token_env`, the first one set), and `--tls`, `--tls-ca`, `--tls-cert`,
    `--tls-key`, `--tls-server-name` (also read from `<tls_env>_TLS_CA` and so on)."""
    names = " or ".join(token_env)

    def token(value: str) -> str:
        try:
            return checked_token(value, f"the token (--token, or {names})")
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "--token",
        type=token,
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


def from_options(
    args: argparse.Namespace,
    target: str,
    max_message_bytes: int,
    max_answer_bytes: int | None = None,
) -> grpc.Channel:
    """The channel that the options `add_options` declared ask for.

    Raises:
        ConfigurationError: `target` names no port (gRPC would dial 443, a port nobody gave)
            or one outside 1 to 65535 (gRPC would dial it modulo 65536: another port, perhaps
            another service, answering for it).
    """
    _host, colon, port = target.rpartition(":")
    if not (colon and port.isascii() and port.isdigit()):
        raise ConfigurationError(f"{target!r} names no port: give HOST:PORT")
    if not 1 <= int(port) <= 65535:
        raise ConfigurationError(f"{target!r} names port {port}, outside 1 to 65535")
    files = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    secure = args.tls or files.enabled
    return open_channel(
        target,
        max_message_bytes,
        token=args.token,
        tls=files if secure else None,
        server_name=args.tls_server_name,
        max_answer_bytes=max_answer_bytes,
    )
