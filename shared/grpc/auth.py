"""Bearer-token auth and TLS credentials for both services.

Tokens travel as `authorization: Bearer <token>` metadata and are compared in constant time. The
health service is always open (load balancers and compose health checks probe it without
credentials). A server may know two tokens: the one that grants its own plane, and a weaker one
that identifies a caller without granting it (the data plane's token presented to the sync plane):
that caller gets PERMISSION_DENIED rather than UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

OPEN_METHODS = ("/grpc.health.v1.Health/",)


def _deny(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(abort)


def _deny_stream(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    def abort(request_iterator: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admit calls carrying `token`; name callers presenting `weaker` as not permitted."""

    def __init__(self, token: str, plane: str, weaker: str | None = None) -> None:
        self._token = token.encode()
        self._weaker = weaker.encode() if weaker else None
        self._plane = plane

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        if method.startswith(OPEN_METHODS):
            return continuation(details)
        presented = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                presented = value.removeprefix("Bearer ").encode()
        if presented is not None and hmac.compare_digest(presented, self._token):
            return continuation(details)
        deny = _deny_stream if method.endswith("/Push") else _deny
        if presented is not None and self._weaker and hmac.compare_digest(presented, self._weaker):
            return deny(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token is not allowed on the {self._plane}",
            )
        reason = "missing" if presented is None else "invalid"
        return deny(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{reason} bearer token for the {self._plane}: send 'authorization: Bearer <token>'",
        )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this side's certificate and key, and the CA that the other side must match."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with this cert; with a CA, clients must present a certificate it signed (mTLS)."""
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs both a certificate and a key")
        ca = self.ca.read_bytes() if self.ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server against the CA; present this cert when given (mTLS)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token` (none when there is no token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
