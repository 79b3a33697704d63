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
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from shared.data.batch import MAX_BATCH_SAMPLES
from shared.data.remote.call import status
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as pb_grpc
from shared.grpc.auth import TlsFiles
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
    """`"a:1,b:2"` or `["a:1", "b:2"]` as a list of addresses."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    found = [a.strip() for a in items if a.strip()]
    if not found:
        raise ValueError("give at least one trainer address (HOST:PORT)")
    return found


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

    def find(self, buffer: str) -> Holder | str:
        """The first trainer that holds `buffer`, or why none could be found."""
        problems = []
        targets = [t for a in self.addresses for t in _targets(a, self._server_name, self._tls)]
        targets.sort(key=lambda t: t[0] != self._last)  # the last holder first: it likely still is
        for gone in set(self._channels) - {target for target, _ in targets}:
            self._channels.pop(gone)[0].close()  # a replica the name no longer resolves to
            del self._collects[gone]
        for target, server_name in targets:
            stub = self._stub(target, server_name)
            try:
                answer = stub.ListBuffers(pb.ListBuffersRequest(), timeout=self._timeout_s)
            except grpc.RpcError as exc:
                problems.append(f"the trainer at {target}: {status(exc)}")
                continue
            names = [b.name for b in answer.buffers]
            if buffer in names:
                self._last = target
                return Holder(
                    target,
                    self._collects[target],
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
        for channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()
        self._collects.clear()


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
