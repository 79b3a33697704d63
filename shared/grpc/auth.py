"""Bearer-token auth and TLS credentials for both services.

Tokens travel as `authorization: Bearer <token>` metadata and are compared in constant time. The
health service is always open (load balancers and compose health checks probe it without
credentials). A server may know two tokens: the one that grants its own plane, and a weaker one
that identifies a caller without granting it (the data plane's token presented to the sync plane):
that caller gets PERMISSION_DENIED rather than UNAUTHENTICATED.

A client CA shared by both planes does not authenticate the sync plane: any data-plane client
would hold a certificate it signed. The inference service counts only its sync token, or a CA
given for the sync plane alone (--tls-sync-client-ca), as sync-plane authentication.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared.errors import ConfigurationError

OPEN_METHODS = ("/grpc.health.v1.Health/",)


class _TokenCheck:
    """Admit calls carrying `token`; name callers presenting `weaker` as not permitted."""

    def __init__(self, token: str, plane: str, weaker: str | None = None) -> None:
        self._token = token.encode()
        self._weaker = weaker.encode() if weaker else None
        self._plane = plane

    def refusal(self, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go ahead, else the status and message to refuse it with."""
        method: str = details.method
        if method.startswith(OPEN_METHODS):
            return None
        presented = None
        headers = 0
        for key, value in details.invocation_metadata or ():
            if key != "authorization":
                continue
            headers += 1
            scheme, _, credentials = (
                value.partition(" ") if isinstance(value, str) else ("", "", "")
            )
            if scheme.lower() == "bearer":  # a scheme's name is case-insensitive (RFC 9110)
                presented = credentials.encode()
        if headers > 1:  # which one counts would be a guess (proxies differ): refuse them all
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"{headers} authorization headers for the {self._plane}: send exactly one, "
                "'authorization: Bearer <token>'",
            )
        if presented is not None and hmac.compare_digest(presented, self._token):
            return None
        if presented is not None and self._weaker and hmac.compare_digest(presented, self._weaker):
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token is not allowed on the {self._plane}",
            )
        reason = "invalid" if presented is not None else "missing" if not headers else "no"
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            f"{reason} bearer token for the {self._plane}: send 'authorization: Bearer <token>'",
        )


class TokenAuthInterceptor(_TokenCheck, grpc.ServerInterceptor):  # type: ignore[misc]
    """Bearer-token auth for a thread-pool server."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        refusal = self.refusal(details)
        if refusal is None:
            return continuation(details)
        code, message = refusal

        def deny(requests: Any, context: grpc.ServicerContext) -> None:
            context.abort(code, message)

        # Request-streaming whatever the method: the refusal goes out at once, where a unary
        # handler would first hold a pool thread until the caller sent its request.
        return grpc.stream_stream_rpc_method_handler(deny)


class AsyncTokenAuthInterceptor(_TokenCheck, grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bearer-token auth for a grpc.aio server."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        refusal = self.refusal(details)
        if refusal is None:
            return await continuation(details)
        code, message = refusal
        handler = await continuation(details)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message)

        if handler is not None and handler.request_streaming:
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(deny)
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this side's certificate and key, and the CA that the other side must match."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        """Any file given: TLS is meant (a key alone is refused by `check`, never plaintext)."""
        return self.cert is not None or self.key is not None or self.ca is not None

    def check(self) -> None:
        """Read every file given. ConfigurationError, naming the file, for one that cannot be
        read or holds no PEM, or a certificate without its key or the reverse: found at start,
        before a process says it is ready, not at its first connection."""
        if (self.cert is None) != (self.key is None):
            given = f"a certificate ({self.cert})" if self.key is None else f"a key ({self.key})"
            raise ConfigurationError(f"TLS needs a certificate and its key; only {given} given")
        for path, marker in ((self.cert, CERTIFICATE), (self.key, PRIVATE_KEY)):
            if path is not None:
                _pem(path, marker)
        if self.ca is not None:
            _pem(self.ca, CERTIFICATE)
        if self.cert is not None and self.key is not None:
            _check_pair(self.cert, self.key)

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with this cert; with a CA, clients must present a certificate it signed (mTLS)."""
        self.check()
        if self.cert is None or self.key is None:
            raise ConfigurationError("a TLS server needs a certificate and its key")
        ca = _pem(self.ca, CERTIFICATE) if self.ca else None
        return grpc.ssl_server_credentials(
            [(_pem(self.key, PRIVATE_KEY), _pem(self.cert, CERTIFICATE))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server against the CA; present this cert when given (mTLS)."""
        self.check()
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca, CERTIFICATE) if self.ca else None,
            private_key=_pem(self.key, PRIVATE_KEY) if self.key else None,
            certificate_chain=_pem(self.cert, CERTIFICATE) if self.cert else None,
        )


CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY = b"PRIVATE KEY-----"  # BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY, BEGIN EC ...


def _pem(path: Path, marker: bytes) -> bytes:
    """The PEM file at `path`. ConfigurationError, naming it, when it holds no `marker` line:
    gRPC would only fail later, as a port it cannot bind or a connection that fails."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the TLS file {path}: {exc.strerror}") from None
    if marker not in data:
        what = "certificate" if marker == CERTIFICATE else "private key"
        raise ConfigurationError(f"{path} holds no PEM {what}")
    return data


def _check_pair(cert: Path, key: Path) -> None:
    """ConfigurationError, naming both files, unless `key` is the private key of `cert`'s
    certificate (and not one sealed with a password, which gRPC cannot open): gRPC would
    report a mismatched pair only as a port it cannot bind, or a handshake that fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:  # a password asked for is refused, never prompted for
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"the TLS key {key} is not the key of the certificate {cert}, or cannot be read "
            f"without a password ({exc.reason or exc})"
        ) from None


# The longest token a client may send: gRPC refuses a call whose metadata passes 8 KiB to 16 KiB
# (RESOURCE_EXHAUSTED, at random between the two), so a longer one fails every call.
MAX_TOKEN_CHARS = 4096


def checked_token(token: str, what: str = "the token") -> str:
    """`token` if a gRPC header can carry it; else ConfigurationError calling it `what`. A
    space, a newline (read with the file it was kept in) or a control character would make
    every call fail on the client ("Invalid metadata"), whatever the service requires, and so
    would a token beyond MAX_TOKEN_CHARS (its metadata too large)."""
    if not all("!" <= c <= "~" for c in token):
        raise ConfigurationError(
            f"{what} holds characters a gRPC header cannot carry: it must be printable ASCII, "
            "without spaces or a trailing newline"
        )
    if len(token) > MAX_TOKEN_CHARS:
        raise ConfigurationError(
            f"{what} is {len(token)} characters long; at most {MAX_TOKEN_CHARS} fit in the "
            "metadata of a gRPC call"
        )
    return token


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token` (none when there is no token); ConfigurationError
    for a token no header can carry."""
    return (("authorization", f"Bearer {checked_token(token)}"),) if token else ()
