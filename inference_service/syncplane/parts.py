"""What a push is made of, whichever transport brings it: a header, data, a commit.

A push is one header, then its payload (a safetensors file) in any number of data parts, then
one commit carrying the digest of the state the push makes. The gRPC servicer decodes
weightsync.v1 PushRequest messages into these parts (messages.py); the sync relay decodes them
in its own process and carries the parts over its push link as they are (relay/link.py);
a rollback makes them from a stored version. One handler takes them all (handler.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True)
class Hop:
    """One replica down a push's route: where to dial it, the name its TLS certificate carries
    (empty: the address's host), and the writer epoch the trainer holds there."""

    address: str
    server_name: str = ""
    writer_epoch: int = 0


@dataclass(frozen=True)
class HopResult:
    """What became of a push on one hop: the version it committed, else (version 0) the status
    code's number, error-reason and message it failed with."""

    address: str
    version: int = 0
    code: int = 0
    reason: str = ""
    message: str = ""

    @property
    def committed(self) -> bool:
        return self.version != 0


@dataclass(frozen=True)
class PushHeader:
    """What a push says about itself before its payload (not yet checked: handler.py does)."""

    model_name: str
    version: int
    base_version: int
    writer_id: str
    payload_bytes: int
    writer_epoch: int = 0
    route: tuple[Hop, ...] = ()  # replicas to pass the push on to (forward.py)
    resume_from: int = 0  # the payload offset a push resuming a broken one starts at (resume.py)


@dataclass(frozen=True)
class Commit:
    """The end of a push: the digest of the state it makes, to check before the swap."""

    digest: bytes


@dataclass(frozen=True)
class Empty:
    """A message that is none of the three (a PushRequest with no `kind` set): refused where
    it stands, like any part out of place."""


Data: TypeAlias = bytes | memoryview  # payload bytes; a view lasts until the next part is asked for
Part: TypeAlias = PushHeader | Data | Commit | Empty


def kind(part: Part) -> str:
    """The part's name in messages to the sender: header, data, commit or empty."""
    if isinstance(part, PushHeader):
        return "header"
    if isinstance(part, Commit):
        return "commit"
    if isinstance(part, Empty):
        return "empty"
    return "data"


class SenderGone(Exception):
    """The transport lost the sender part-way (it cancelled, or went away). Not a client-facing
    error itself: the handler answers it as a malformed push when it came before the header,
    and after it as a broken push (`push-broken`), kept for a resume; saying how far it got."""


@dataclass(frozen=True)
class PushOutcome:
    """What a committed push is answered with."""

    model_name: str
    version: int
    digest: bytes
    payload_bytes: int
    hops: tuple[HopResult, ...] = ()  # what became of it down its route, in route order
    # From its commit message taken to this outcome: the sender's seconds less these are the
    # stream's (PushResponse.finish_seconds)
    finish_s: float = 0.0
