"""The sync relay program: the sync plane's public gRPC server, in a process of its own.

Why a process: grpcio receiving bulk data costs a serving process's tail latency far more than
the CPU it takes. The serving process shares its gRPC I/O threads and its GIL with whatever it
receives; a separate process shares only CPUs, where the kernel's scheduler and nice values
apply (docs/performance.md has the figures and the command that measures them).

So the inference service starts this program (relay/supervisor.py), which listens on the sync
plane's address at a lower CPU priority, authenticates callers, and:

- decodes each Push's messages into push parts (syncplane/messages.py) and relays the parts
  over a push link (relay/link.py): the payload goes through shared memory, and the service
  answers with the push's outcome or status;
- forwards every other call (GetModel, AcquireWriter, Rollback, Seed, health, reflection,
  ...) as raw bytes to the service's own sync server on a Unix socket, status and trailers
  included, with the caller's deadline capped at FORWARD_DEADLINE_S. That connection is
  watched as a hop's is (`watched_link`, UPSTREAM_WATCH_S): a service that stops answering
  (its process stopped or stuck) fails the calls passed on to it UNAVAILABLE within seconds.

Calls run within the sync plane's budget (shared/grpc/limits.py), counted after authentication.

It runs until the service writes `stop <grace>` to its stdin, or its stdin closes (the service
has gone), and knows nothing of models: its imports stay light, so it starts in a fraction of a
second.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from inference_service.syncplane.limits import sync_budget
from inference_service.syncplane.messages import parts, push_response
from inference_service.syncplane.parts import PushOutcome
from inference_service.syncplane.relay.frames import ServiceStopped, ServiceWatch
from inference_service.syncplane.relay.link import STALL_S, RelayLink
from inference_service.syncplane.relay.pulse import Pulse
from shared.allocator import tune_for_streaming
from shared.cli import configure_logging
from shared.errors import ConfigurationError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.auth import TlsFiles, TokenAuthInterceptor
from shared.grpc.channel import open_channel
from shared.grpc.errors import abort, error_reason
from shared.grpc.options import SYNC_MAX_ANSWER_BYTES, SYNC_MAX_MESSAGE_BYTES, watched_link
from shared.grpc.prefetch import Prefetcher
from shared.grpc.server import bind, lower_thread_priority, new_server
from shared.process import end_process
from shared.settings import ProcessSettings

logger = logging.getLogger("inference_service.sync_relay")

PUSH = "/weightsync.v1.WeightSync/Push"
TOKEN_ENV = "WEIGHTSYNC_RELAY_TOKEN"  # the sync plane's token, passed in the environment
WEAKER_TOKEN_ENV = "WEIGHTSYNC_RELAY_WEAKER_TOKEN"  # the data plane's, refused by name
# Calls forwarded to the service get the caller's deadline, and this one when the caller set
# none or a later one: no forwarded call holds a relay thread for ever. Rollback, the slowest,
# reads a whole model's stored weights and swaps them in.
FORWARD_DEADLINE_S = 600.0
# The connection to the service's sync server is watched while a call forwarded over it is
# open: a ping every quarter of this bound (every 1.5 s), the connection dropped once one goes
# unanswered for half of it (3 s). The caller's own watch of its link ends at the relay, which
# answers its pings whatever the service does; without this one, a call to a service whose
# process is stopped (SIGSTOP, a host paging itself to death) would wait for its deadline: for
# a Seed, whose answer comes only once the whole seeded push is done, the trainer's push
# deadline (600 s by default), and the sync or catch-up that needs the seed with it. The
# service's gRPC transport answers pings while its handlers are busy (a long Seed or Rollback
# keeps its connection), so only a process that does not run at all is cut off. Over a Unix
# socket nothing else delays an answer: the bound is far above a scheduling hiccup, and far
# below any deadline a caller waits on.
UPSTREAM_WATCH_S = 6.0
# A push goes over a push link, not that connection, and its service end cannot answer pings
# (it is the thread applying the push). While the relay waits on a link (for a free slot, the
# answer, room to write), it asks every quarter of the same bound whether the service's process
# runs: one stopped for half of it, or that leaves a heartbeat (pulse.py, answered by a thread of
# the service's own) unanswered that long, is given up, as an unanswered ping is (link.py,
# frames.py).
PUSH_WATCH_EVERY_S = UPSTREAM_WATCH_S / 4
PUSH_STOPPED_S = UPSTREAM_WATCH_S / 2


class LinkPool:
    """Idle push links to the service, reused from push to push."""

    def __init__(self, path: str, service_pid: int, pulse: Pulse | None = None) -> None:
        self._path = path
        self._service_pid = service_pid
        self._pulse = pulse
        self._idle: list[RelayLink] = []
        self._lock = threading.Lock()

    def acquire(self) -> RelayLink:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        watch = ServiceWatch(self._service_pid, PUSH_STOPPED_S, self._pulse)
        return RelayLink(self._path, watch=watch, watch_every_s=PUSH_WATCH_EVERY_S)

    def release(self, link: RelayLink) -> None:
        if not link.healthy:
            link.close()
            return
        with self._lock:
            self._idle.append(link)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for link in idle:
            link.close()
        if self._pulse is not None:
            self._pulse.close()


class Relay(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Push over the links; every other method forwarded to the service as raw bytes."""

    def __init__(self, upstream: grpc.Channel, links: LinkPool) -> None:
        self._upstream = upstream
        self._links = links

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method == PUSH:
            return grpc.stream_unary_rpc_method_handler(
                self._push, response_serializer=pb.PushResponse.SerializeToString
            )
        return grpc.stream_stream_rpc_method_handler(
            functools.partial(self._forward, details.method)
        )

    def _push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushResponse:
        try:
            link = self._links.acquire()
        except OSError as exc:
            logger.error("cannot reach the inference service for a push: %s", exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the inference service is not answering")
        try:
            # The sender's messages are read on a thread of their own, so that a refusal the
            # service sends while the sender stalls still reaches it at once: grpcio's sync API
            # cannot end a call from outside the handler's thread, which would otherwise be
            # blocked waiting for the sender's next message.
            with Prefetcher(requests, name="relay-push") as ahead:
                answer = link.push(parts(ahead.waiting(STALL_S), context.is_active))
        except ServiceStopped as exc:
            # The link is left mid-push: closed, it makes the service drop the push (and
            # anything it still finds on it) when it runs again, so nothing of it is applied.
            logger.error("the inference service stopped answering the sync relay (Push): %s", exc)
            link.close()
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the inference service stopped answering the sync relay during the push: {exc}",
            )
        except OSError as exc:
            logger.error("the inference service went away during a push: %s", exc)
            link.close()
            context.abort(
                grpc.StatusCode.UNAVAILABLE, "the inference service stopped during the push"
            )
        self._links.release(link)
        if isinstance(answer, PushOutcome):
            return push_response(answer)
        abort(context, answer)

    def _forward(
        self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        metadata = tuple(
            (key, value)
            for key, value in context.invocation_metadata()
            if key != "user-agent" and not key.startswith("grpc-")
        )
        remaining = context.time_remaining()  # without a deadline: a far future, not None
        call: Any = self._upstream.stream_stream(method)(
            _until_cancelled(requests),
            metadata=metadata,
            timeout=min(FORWARD_DEADLINE_S, FORWARD_DEADLINE_S if remaining is None else remaining),
        )
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as error:
            if _service_silent(error):
                logger.error(
                    "the inference service stopped answering the sync relay (%s): %s",
                    method.rsplit("/", 1)[-1],
                    error.details(),
                )
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the inference service stopped answering the sync relay (its process is "
                    f"stopped, stuck or gone): {error.details() or 'connection lost'}",
                )
            context.set_trailing_metadata(error.trailing_metadata() or ())
            context.abort(error.code(), error.details() or "")
        context.set_trailing_metadata(call.trailing_metadata() or ())


def _until_cancelled(requests: Iterator[bytes]) -> Iterator[bytes]:
    """The caller's messages, ending quietly where the caller cancels or drops the call (a
    health Watch closed): its server-side iterator raises then, which grpcio, reading it for
    the forwarded call, would log as an error with a traceback. The forwarded call is
    cancelled by the callback the caller's end runs."""
    try:
        yield from requests
    except grpc.RpcError:
        return


def _service_silent(error: grpc.RpcError) -> bool:
    """Whether a forwarded call failed because the service did not answer at all (its
    connection dropped by the watch, or refused): UNAVAILABLE made by the relay's own transport.
    The service's own UNAVAILABLE statuses carry an `error-reason` and pass on unchanged."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and not error_reason(error)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m inference_service.syncplane.relay.process")
    parser.add_argument("--listen", required=True, help="the sync plane's public address")
    parser.add_argument("--upstream", required=True, help="the service's sync server socket")
    parser.add_argument("--links", required=True, help="the service's push link socket")
    parser.add_argument("--pulse", help="the service's heartbeat socket (relay/pulse.py)")
    parser.add_argument("--max-concurrent", type=int, default=8)
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-client-ca", type=Path)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def _say(**info: object) -> None:
    """One JSON line to the service, which reads the relay's stdout."""
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the service stops us
    lower_thread_priority(args.nice)  # gRPC's threads, started below, inherit it
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "sync-relay").malloc)
    token = os.environ.pop(TOKEN_ENV, None)
    weaker = os.environ.pop(WEAKER_TOKEN_ENV, None)
    interceptors = [TokenAuthInterceptor(token, "sync plane", weaker=weaker)] if token else []
    upstream = open_channel(
        f"unix:{args.upstream}",
        SYNC_MAX_MESSAGE_BYTES,
        options=watched_link(UPSTREAM_WATCH_S),
        max_answer_bytes=SYNC_MAX_ANSWER_BYTES,
    )
    pulse = Pulse(args.pulse) if args.pulse else None
    links = LinkPool(args.links, os.getppid(), pulse)  # the service started this process
    budget = sync_budget(args.max_concurrent)
    server = new_server(
        budget.threads,
        SYNC_MAX_MESSAGE_BYTES,
        interceptors,
        budget=budget,
        name="relay",
        frequent_pings=True,  # hops passing a push on watch their link (leg.py)
        max_answer_bytes=SYNC_MAX_ANSWER_BYTES,
    )
    server.add_generic_rpc_handlers((Relay(upstream, links),))
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        port = bind(server, args.listen, tls if tls.enabled else None, "--sync-listen")
    except (OSError, ConfigurationError) as exc:
        _say(error=str(exc))
        return 2
    server.start()
    _say(port=port, pid=os.getpid())
    grace = None
    for line in sys.stdin:  # the service's word; end of input: the service has gone
        if line.startswith("stop"):
            grace = float(line.split()[1])
            break
    server.stop(grace or 0.0).wait()
    links.close()
    upstream.close()
    private = Path(args.links).parent
    if grace is None and private.name.startswith("weightsync-sync-"):
        shutil.rmtree(private, ignore_errors=True)  # the service died; tidy up for it
    return 0


if __name__ == "__main__":
    end_process(main())
