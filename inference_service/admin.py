"""`weightsync-admin`: list models and versions on an inference service, and roll back.

    weightsync-admin --sync 127.0.0.1:8101 models
    weightsync-admin --sync 127.0.0.1:8101 versions quickstart
    weightsync-admin --sync 127.0.0.1:8101 rollback quickstart --to 12

Against a guarded sync plane, give the sync token (INFERENCE_SYNC_TOKEN or TRAINER_SYNC_TOKEN in
the environment, or --token) and, with TLS, the CA that signed the service's certificate
(--tls-ca) and for mutual TLS a client certificate and key (--tls-cert, --tls-key); the TLS
files are also read from TRAINER_TLS_CA, TRAINER_TLS_CERT and TRAINER_TLS_KEY, as a trainer would.

A rollback serves the stored weights of an earlier version again as a new version, through the
same checks and atomic swap as any push. A trainer still running will push its own weights on its
next sync; stop it first if the rollback should stick.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence

import grpc

from inference_service.lease import COUNTER_LIMIT
from shared.errors import ConfigurationError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.grpc.channel import add_options, from_options
from shared.grpc.options import SYNC_MAX_ANSWER_BYTES, SYNC_MAX_MESSAGE_BYTES

TOKEN_ENV = ("INFERENCE_SYNC_TOKEN", "TRAINER_SYNC_TOKEN")
TLS_ENV = "TRAINER"


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")


def _version(value: str) -> int:
    """A version number a rollback can name: 1 to 2^63 - 1."""
    try:
        version = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a version number") from None
    if not 1 <= version < COUNTER_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is outside 1 to {COUNTER_LIMIT - 1}")
    return version


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weightsync-admin", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sync",
        default=os.environ.get("INFERENCE_SYNC_ADDRESS", "127.0.0.1:8101"),
        help="sync-plane address of the inference service (env INFERENCE_SYNC_ADDRESS)",
    )
    add_options(parser, TOKEN_ENV, TLS_ENV)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="the models served, their versions and writers")
    versions = commands.add_parser("versions", help="the versions of a model kept on disk")
    versions.add_argument("model")
    rollback = commands.add_parser("rollback", help="serve an earlier version again")
    rollback.add_argument("model")
    rollback.add_argument("--to", type=_version, required=True, help="the version to serve again")
    args = parser.parse_args(argv)

    try:
        channel = from_options(args, args.sync, SYNC_MAX_MESSAGE_BYTES, SYNC_MAX_ANSWER_BYTES)
    except ConfigurationError as exc:
        print(f"weightsync-admin: {exc}", file=sys.stderr)
        return 2
    stub = pb_grpc.WeightSyncStub(channel)
    try:
        if args.command == "models":
            for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models:
                pushes = "accepts pushes" if m.accepts_pushes else "inference-only"
                print(f"{m.model_name}\tversion {m.version}\t{m.writer_id or '-'}\t{pushes}")
        elif args.command == "versions":
            answer = stub.ListVersions(pb.ListVersionsRequest(model_name=args.model), timeout=10)
            for v in answer.versions:
                mark = "*" if v.version == answer.serving else " "
                print(
                    f"{mark} {v.version}\t{_when(v.committed_at)}\t{v.writer_id}\t"
                    f"{v.size_bytes} bytes\t{v.digest.hex()[:16]}"
                )
            if not answer.versions:
                print(f"{args.model}: no versions kept on disk (serving version {answer.serving})")
        else:
            state = stub.Rollback(
                pb.RollbackRequest(model_name=args.model, to_version=args.to), timeout=600
            )
            print(f"{state.model_name}: now serving version {state.version} ({state.writer_id})")
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
