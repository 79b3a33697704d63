"""Server and channel options, set explicitly on both ends."""

from __future__ import annotations

MiB = 1 << 20

# Weights travel in chunks well under this; inference requests may be larger (batches).
SYNC_MAX_MESSAGE_BYTES = 16 * MiB
DATA_MAX_MESSAGE_BYTES = 64 * MiB


def server_options(max_message_bytes: int, frequent_pings: bool = False) -> list[tuple[str, int]]:
    """`frequent_pings`: clients may ping as often as they like (the sync plane: a replica
    passing a push on pings its hop every fraction of a second, see `watched_link`)."""
    strikes = [("grpc.http2.max_ping_strikes", 0)] if frequent_pings else []
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would start
        # silently and steal traffic. Fail the bind instead.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        *strikes,
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def watched_link(bound_s: float) -> list[tuple[str, int]]:
    """Channel arguments that drop the connection (the call fails UNAVAILABLE) once the peer has
    acknowledged nothing for about `bound_s` / 2: a ping every `bound_s` / 4 while a call is
    open (gRPC spaces pings a second apart at least), answered by the peer's transport even
    while its handlers are busy, dropped when unanswered for `bound_s` / 2 (the ping timeout:
    gRPC's keepalive timeout alone does not bound it), and TCP giving up on bytes
    unacknowledged for as long (gRPC sets TCP_USER_TIMEOUT to the keepalive timeout). A link
    gone dark, or a peer whose process stopped, is noticed that soon, even on a call where
    nothing flows (a Seed waiting for its answer); the server must take frequent pings
    (`server_options(frequent_pings=True)`)."""
    timeout_ms = max(int(bound_s * 500), 20)
    return [
        ("grpc.keepalive_time_ms", max(timeout_ms // 2, 10)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),  # what bounds the wait for an ack
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]
