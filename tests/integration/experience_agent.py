"""An agent process for the experience-plane tests: `python -m tests.integration.experience_agent`.

It collects `--count` samples (ids `--first-id` onwards, x in [0, 1), y = 3x) into the buffer
`steps` of the trainer at `--address` through a RemoteDataCollector, pausing `--pause` seconds
between samples, and prints `acknowledged K dropped D` each time the trainer has acknowledged
more; at the end it flushes, closes and prints `stats <json>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from shared.data.remote import RemoteDataCollector
from shared.grpc.auth import TlsFiles


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--first-id", type=int, default=0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pki", type=Path, default=None)
    args = parser.parse_args()
    tls = None
    if args.pki is not None:
        tls = TlsFiles(args.pki / "client.pem", args.pki / "client.key", args.pki / "ca.pem")
    collector = RemoteDataCollector(
        args.address,
        "steps",
        token=os.environ.get("AGENT_TOKEN"),
        tls=tls,
        server_name="weightsync.test" if tls else None,
        batch_size=args.batch_size,
    )
    generator = torch.Generator().manual_seed(args.first_id)
    reported = 0
    for i in range(args.first_id, args.first_id + args.count):
        x = torch.rand(1, generator=generator)
        collector.collect({"x": x, "y": 3 * x, "id": torch.tensor(i)})
        stats = collector.stats
        if stats.acknowledged > reported:
            reported = stats.acknowledged
            print(f"acknowledged {stats.acknowledged} dropped {stats.dropped}", flush=True)
        if args.pause:
            time.sleep(args.pause)
    collector.flush(timeout=60)
    final = collector.close()
    print(f"stats {json.dumps(dataclasses.asdict(final))}", flush=True)


if __name__ == "__main__":
    main()
