"""`python -m shared.healthcheck HOST:PORT`: exit 0 only if grpc.health.v1 says SERVING.

Container images carry no grpcurl or grpc_health_probe; compose health checks call this. Health
needs no token on either plane, but a token given (--token, or INFERENCE_DATA_TOKEN in the
environment) is sent. For a service that serves TLS, give the CA that signed its certificate
(--tls-ca, or --tls for the system's CAs), and for mutual TLS a client certificate and key
(--tls-cert, --tls-key); HEALTHCHECK_TLS_CA, HEALTHCHECK_TLS_CERT, HEALTHCHECK_TLS_KEY and
HEALTHCHECK_TLS_SERVER_NAME set them from the environment. Every failure exits 1, a usage error
included: Docker reserves exit 2 ("do not use"), which argparse gives by default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.cli import seconds
from shared.errors import ConfigurationError
from shared.grpc.channel import add_options, from_options
from shared.grpc.options import MiB

TOKEN_ENV = ("INFERENCE_DATA_TOKEN",)
TLS_ENV = "HEALTHCHECK"


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1, not argparse's 2 (reserved by Docker's health checks)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m shared.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of a gRPC server")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", default="3", help="deadline (seconds, or 500ms, 1m)")
    add_options(parser, TOKEN_ENV, TLS_ENV)
    args = parser.parse_args(argv)
    try:
        timeout = seconds(args.timeout, positive=True)
    except ValueError as exc:
        print(f"healthcheck: --timeout: {exc}", file=sys.stderr)
        return 1  # docker reserves 2; any failure here is "unhealthy"
    try:
        channel = from_options(args, args.address, MiB)
    except ConfigurationError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"{args.address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
