"""Register a service's methods by hand, for services whose streaming calls take raw bytes.

The sync plane's Push and the experience plane's Collect read their messages unparsed (see
shared/weights/wire.py), so those services are registered here rather than through the
generated `add_*Servicer_to_server`; their unary calls parse and serialize as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message


def unary(
    method: Callable[..., Any], request: type[Message], response: type[Message]
) -> grpc.RpcMethodHandler:
    """A unary-unary handler that parses `request` and serializes `response` messages."""
    return grpc.unary_unary_rpc_method_handler(
        method,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


def register(server: grpc.Server, service: str, handlers: Mapping[str, Any]) -> None:
    """Add `handlers` (method name -> handler) to `server` as the service `service`."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
