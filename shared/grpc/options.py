"""Server and channel options, set explicitly on both ends."""

from __future__ import annotations

MiB = 1 << 20

# Weights travel in chunks well under this; inference requests may be larger (batches).
SYNC_MAX_MESSAGE_BYTES = 16 * MiB
DATA_MAX_MESSAGE_BYTES = 64 * MiB


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would start
        # silently and steal traffic. Fail the bind instead.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
