"""Which trainer holds a buffer, among the addresses a RemoteDataCollector was given.

Trainers that split an app's trainer groups between them each hold the buffers of their own
group, and a standby that takes a group over holds them from then on, at its own address. So a
collector may be given several addresses (`"a:8201,b:8201"`), or one name that resolves to
several (a compose service's replicas): each time it connects it asks each trainer, in turn,
which buffers it holds (experience.v1 ListBuffers), the last one found first, and streams to
the first that holds its own. It connects whenever its call ends (broken, refused, or idle), so
names are resolved again then: replicas added later are found, and channels to addresses a
name no longer resolves to are closed.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from shared.data.batch import MAX_BATCH_SAMPLES
from shared.data.remote.call import status
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as pb_grpc
from shared.grpc.address import checked_address
from shared.grpc.auth import TlsFiles, checked_token
from shared.grpc.channel import open_channel

COLLECT = "/experience.v1.Experience/Collect"


@dataclass(frozen=True)
class Holder:
    """The trainer holding the buffer, and the largest batch it takes (bytes, samples)."""

    address: str
    collect: grpc.StreamStreamMultiCallable  # Collect, taking Batch messages serialized
    max_batch_bytes: int
    max_batch_samples: int


def split_addresses(addresses: str | Sequence[str]) -> list[str]:
    """`"a:1,b:2"` or `["a:1", "b:2"]` as a list of addresses, each checked (ValueError
    naming what is wrong with one; `unix:PATH` is taken as it is)."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    found = [a.strip() for a in items if a.strip()]
    if not found:
        raise ValueError("give at least one trainer address (HOST:PORT)")
    for address in found:
        if not address.startswith("unix:"):
            checked_address(address, "a trainer's experience address")
    return found


def check_credentials(
    address: str, token: str | None, tls: TlsFiles | None, server_name: str | None
) -> None:
    """Refuse a token or TLS settings no call to a trainer's experience plane at `address`
    could use (see `Route`): the token must be printable ASCII, each TLS file readable and a
    PEM of its kind, a server name given with TLS only.

    Raises:
        ConfigurationError: Naming what is wrong.
    """
    if token:
        checked_token(token, "the experience token")
    # A channel dials nothing until called: opening one checks the credentials alone.
    open_channel(address, 1 << 20, token=token, tls=tls, server_name=server_name).close()


class Route:
    def __init__(
        self,
        addresses: Sequence[str],
        max_message_bytes: int,
        *,
        token: str | None,
        tls: TlsFiles | None,
        server_name: str | None,
        timeout_s: float,
    ) -> None:
        self.addresses = list(addresses)
        self._max_message_bytes = max_message_bytes
        self._token = token
        self._tls = tls
        self._server_name = server_name
        self._timeout_s = timeout_s
        self._channels: dict[str, tuple[grpc.Channel, pb_grpc.ExperienceStub]] = {}
        self._collects: dict[str, grpc.StreamStreamMultiCallable] = {}
        self._last: str | None = None
        # `close` may come from another thread while `find` waits on a trainer: it ends that
        # wait (closing a channel cancels its calls), and `find` dials nothing after it.
        self._guard = threading.Lock()
        self._closed = False
        self._check()

    def _check(self) -> None:
        """Refuse a token or TLS settings no call could use, now: found only when the sending
        thread first dials, they would end it and leave samples waiting for nothing.

        Raises:
            ConfigurationError: The token holds what no gRPC header value may (anything but
                printable ASCII), or a TLS file cannot be read or holds no PEM of its kind,
                or a server name is given without TLS.
        """
        check_credentials(self.addresses[0], self._token, self._tls, self._server_name)

    def find(self, buffer: str) -> Holder | str:
        """The first trainer that holds `buffer`, or why none could be found."""
        problems = []
        targets = [t for a in self.addresses for t in _targets(a, self._server_name, self._tls)]
        targets.sort(key=lambda t: t[0] != self._last)  # the last holder first: it likely still is
        with self._guard:
            for gone in set(self._channels) - {target for target, _ in targets}:
                self._channels.pop(gone)[0].close()  # a replica the name no longer resolves to
                del self._collects[gone]
        for target, server_name in targets:
            with self._guard:
                if self._closed:
                    return "the collector is closed"
                stub = self._stub(target, server_name)
                collect = self._collects[target]
            try:
                answer = stub.ListBuffers(pb.ListBuffersRequest(), timeout=self._timeout_s)
            except grpc.RpcError as exc:
                problems.append(f"the trainer at {target}: {status(exc)}")
                continue
            except ValueError:  # the channel was closed just before the call
                return "the collector is closed"
            names = [b.name for b in answer.buffers]
            if buffer in names:
                self._last = target
                return Holder(
                    target,
                    collect,
                    int(answer.max_batch_bytes),
                    int(answer.max_batch_samples or MAX_BATCH_SAMPLES),
                )
            problems.append(
                f"the trainer at {target} holds no buffer {buffer!r} (it holds "
                f"{', '.join(names) or 'none'})"
            )
        return "; ".join(problems)

    def _stub(self, target: str, server_name: str | None) -> pb_grpc.ExperienceStub:
        if target not in self._channels:
            channel = open_channel(
                target,
                self._max_message_bytes,
                token=self._token,
                tls=self._tls,
                server_name=server_name,
            )
            self._channels[target] = (channel, pb_grpc.ExperienceStub(channel))
            self._collects[target] = channel.stream_stream(
                COLLECT, request_serializer=None, response_deserializer=pb.BatchAck.FromString
            )
        return self._channels[target][1]

    def close(self) -> None:
        """Close every channel, cancelling the calls on them (a `find` waiting on a trainer
        that does not answer ends at once)."""
        with self._guard:
            self._closed = True
            channels = [channel for channel, _ in self._channels.values()]
            self._channels.clear()
            self._collects.clear()
        for channel in channels:
            channel.close()


def _targets(
    address: str, server_name: str | None, tls: TlsFiles | None
) -> list[tuple[str, str | None]]:
    """The targets to dial for `address`, each with the name its certificate must carry: a
    host name that resolves to several addresses stands for each of them (in TLS, verified
    under that name); anything else is dialled as given."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or address.startswith("unix:"):
        return [(address, server_name)]
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return [(address, server_name)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return [(address, server_name)]  # the dial reports it
    ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if len(ips) <= 1:
        return [(address, server_name)]
    name = (server_name or host) if tls is not None else None
    return [(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", name) for ip in ips]
