"""Server and channel options, set explicitly on both ends."""

from __future__ import annotations

MiB = 1 << 20

# Weights travel in chunks well under this; inference requests may be larger (batches).
SYNC_MAX_MESSAGE_BYTES = 16 * MiB
DATA_MAX_MESSAGE_BYTES = 64 * MiB
# What a sync-plane answer may hold: the tensor table of a model whose header is near
# --max-header-bytes (GetModel), every model's at once (ListModels). Answers are the service's
# own making; only what callers send is bounded by SYNC_MAX_MESSAGE_BYTES.
SYNC_MAX_ANSWER_BYTES = 1024 * MiB

# How soon after its previous ping a gRPC client sends the next while a call is open: a second
# at the soonest, whatever its keepalive time (chttp2's ping rate policy). The wait starts over
# when data arrives from the server, and a gRPC server forgets the pings it has counted when it
# sends data, so a ping sooner than this only follows data the server sent.
GRPC_PING_SPACING_MS = 1_000

# How many pings sooner than the floor a gRPC server takes, between two sends of its own data,
# before it sends GOAWAY (ENHANCE_YOUR_CALM, "too_many_pings") and closes the connection
# (gRPC's default, set here so that nothing else changes it).
PING_STRIKES = 2

# gRPC's set of compression algorithms a server takes, as a bit per algorithm: identity alone.
IDENTITY_ONLY = 1

# Read-ahead on the data plane: what a stream's transport takes beyond the message its handler
# asks for, which the service holds whether or not it ever reads it. gRPC grows it with its
# bandwidth-delay estimate, to hundreds of MiB a stream on a fast link, so clients that write
# to ModelStreamInfer streams and never read their answers (the handler then stops reading
# requests) grew a service past 11 GiB with ten streams; without the estimate each stream reads
# ahead gRPC's 64 KiB. A message its handler asks for still gets a window of its own size, so
# requests and unary calls flow as before. The sync plane keeps the estimate: it reads every
# push as it comes, and its links are long and fast.
BOUNDED_READ_AHEAD: list[tuple[str, int]] = [("grpc.http2.bdp_probe", 0)]


def server_options(
    max_message_bytes: int, frequent_pings: bool = False, max_answer_bytes: int | None = None
) -> list[tuple[str, int]]:
    """`frequent_pings`: the sync plane, where clients watching their link (`watched_link`: a
    replica passing a push on, a trainer's Seed) ping about once a second while a call is open,
    and the server may send nothing for the whole call (a client-streaming push answers only
    at its end). Such a server takes pings down to `sync_ping_floor_ms()` apart; a client
    pinging faster (a flood, before any authentication) is sent GOAWAY after `PING_STRIKES`
    such pings. Other servers take one ping per 10 s. `max_answer_bytes`: the largest message
    it sends, where that differs from the largest it takes."""
    floor_ms = sync_ping_floor_ms() if frequent_pings else 10_000
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_answer_bytes or max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would start
        # silently and steal traffic. Fail the bind instead.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        # gRPC's name for its minimum interval between received pings (a misspelt argument is
        # ignored silently, leaving gRPC's default of 5 minutes).
        ("grpc.http2.min_ping_interval_without_data_ms", floor_ms),
        ("grpc.http2.max_ping_strikes", PING_STRIKES),
        ("grpc.keepalive_permit_without_calls", 1),
        # Take uncompressed messages only: gRPC inflates a compressed message whole before it
        # compares its size with the limit, so a few MB of gzip would take GBs of memory. A
        # call sent compressed is refused (UNIMPLEMENTED) before any of it is inflated.
        ("grpc.compression_enabled_algorithms_bitset", IDENTITY_ONLY),
    ]


def channel_options(
    max_message_bytes: int, max_answer_bytes: int | None = None
) -> list[tuple[str, int]]:
    """`max_answer_bytes`: the largest message taken from the server, where that differs
    from the largest sent to it."""
    return [
        ("grpc.max_receive_message_length", max_answer_bytes or max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def watched_link(bound_s: float) -> list[tuple[str, int]]:
    """Channel arguments that drop the connection (the call fails UNAVAILABLE) once the peer has
    acknowledged nothing for about `bound_s` / 2, or `WATCH_TIMEOUT_FLOOR_MS` when that is
    longer: a ping every half of that while a call is open (but never sooner than
    `GRPC_PING_SPACING_MS` after the previous one, see `watched_ping_interval_ms`), answered
    by the peer's transport even while its handlers are busy, dropped when unanswered for as
    long (the ping timeout: gRPC's keepalive
    timeout alone does not bound it), and TCP giving up on bytes unacknowledged for as long
    (gRPC sets TCP_USER_TIMEOUT to the keepalive timeout). A link gone dark, or a peer whose
    process stopped, is noticed that soon, even on a call where nothing flows (a Seed waiting
    for its answer); the server must take frequent pings
    (`server_options(frequent_pings=True)`)."""
    keepalive_ms, timeout_ms = _watch_times_ms(bound_s)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),  # what bounds the wait for an ack
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def watched_ping_interval_ms(bound_s: float) -> int:
    """How far apart `watched_link(bound_s)` sends its pings at the closest: its keepalive
    time, or gRPC's spacing when that is longer (it is for every bound under 4 s)."""
    return max(_watch_times_ms(bound_s)[0], GRPC_PING_SPACING_MS)


def watch_timeout_s(bound_s: float) -> float:
    """How long `watched_link(bound_s)` waits for a ping's answer before it drops the link."""
    return _watch_times_ms(bound_s)[1] / 1000


def sync_ping_floor_ms() -> int:
    """The closest two pings may come to a sync-plane server without counting against the
    client: a quarter of the closest spacing any `watched_link` sends them at (its bound near
    zero), which leaves a ping three quarters of that spacing to be delayed on the link behind
    the bytes ahead of it before the next, sent on time, arrives too soon. A flood (thousands
    of pings a second) is far below it."""
    return watched_ping_interval_ms(0.0) // 4


# The shortest wait for a ping's acknowledgement (and for TCP to have bytes acknowledged): a
# peer on a loaded host, or behind a link's queue of bytes, may take a few hundred ms to answer
# while it is alive and taking data. A stopped peer or a dark link is noticed after this; a
# stalled push sooner, by the bounds on data taken (which are not pings).
WATCH_TIMEOUT_FLOOR_MS = 1_000


def _watch_times_ms(bound_s: float) -> tuple[int, int]:
    """`watched_link`'s keepalive time and ping timeout for `bound_s`, in ms."""
    timeout_ms = max(int(bound_s * 500), WATCH_TIMEOUT_FLOOR_MS)
    return max(timeout_ms // 2, 10), timeout_ms
