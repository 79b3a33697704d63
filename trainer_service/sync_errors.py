"""How a sync can fail, as the publisher raises it and the training loop acts on it: retry
later (SyncFailedError), leave it to later syncs (SyncRefusedError), stop (WriterFencedError,
exit status 3), or stop at start (SyncMisconfiguredError at the first push, exit status 2)."""

from __future__ import annotations

import grpc


class SyncFailedError(Exception):
    """No inference service could be reached, or one that answered refused the new weights."""


class SyncRefusedError(SyncFailedError):
    """A service that answered refused the new weights (another layout, a bad tensor): the
    version is spent, and later syncs (or the catch-up) try that service again; retrying at
    once would not change its answer."""


class WriterFencedError(SyncFailedError):
    """Another trainer has taken this model over; this one must stop pushing it."""


class SyncMisconfiguredError(SyncFailedError):
    """A service answered that this trainer cannot push to it at all, whatever it sends: its
    token or certificate is not taken there, or the address serves no sync plane (a data
    plane, another service). Retrying cannot help; the configuration must change."""


# What a service answers a trainer that is not configured to push to it.
MISCONFIGURED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def unreadable(code: grpc.StatusCode) -> type[SyncFailedError]:
    """How a sync fails when a target answered `code` to the question of what it serves: a
    service that does not serve the model (another app there) refuses it, as one that refuses
    its layout does; retrying at once would not change its answer."""
    if code in MISCONFIGURED:
        return SyncMisconfiguredError
    return SyncRefusedError if code is grpc.StatusCode.NOT_FOUND else SyncFailedError
