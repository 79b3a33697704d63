"""Query a learning curve model while it learns: served version and error, once a second.

python examples/client.py --address 127.0.0.1:8001 [--model quickstart|sine|cosine] [--seconds 30]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import grpc
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.two_models import CURVES
from inference_service.client import InferenceClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:8001", help="data plane HOST:PORT")
    parser.add_argument(
        "--model",
        default="quickstart",
        choices=["quickstart", *CURVES],
        help="quickstart (examples/quickstart.py) or a model of examples/two_models.py",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to keep querying")
    args = parser.parse_args()
    x = torch.linspace(-2, 2, 101).unsqueeze(1)
    truth = CURVES["sine" if args.model == "quickstart" else args.model](x)
    deadline = time.monotonic() + args.seconds
    try:
        client = InferenceClient(args.address)
    except ValueError as error:  # an address that cannot be one: say so, not a traceback
        parser.error(f"--address: {error}")
    with client:
        info = None
        while info is None:  # the service may not be up yet: say why, and try again
            try:
                info = client.metadata(args.model)
            except grpc.RpcError as error:
                print(f"request failed: {error.code().name}: {error.details()}", flush=True)
                if time.monotonic() >= deadline:
                    return 1
                time.sleep(1)
        inputs = [(t.name, t.datatype, list(t.shape)) for t in info.inputs]
        outputs = [(t.name, t.datatype, list(t.shape)) for t in info.outputs]
        print(f"model {info.name}: inputs {inputs} -> outputs {outputs}")
        print(f"{'time':>6}  {'version':>7}  {'rmse':>8}")
        started = time.monotonic()
        while time.monotonic() < deadline:
            try:
                result = client.infer(args.model, {"x": x})
            except grpc.RpcError as error:
                print(f"request failed: {error.code().name}: {error.details()}")
                time.sleep(1)
                continue
            rmse = torch.sqrt(torch.mean((result.outputs["y"] - truth) ** 2)).item()
            print(
                f"{time.monotonic() - started:6.1f}  {result.version:7d}  {rmse:8.4f}", flush=True
            )
            time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
