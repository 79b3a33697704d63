"""What the element-level encodings and the served dtype save on a link, on real optimizer steps.

For each case, a model of `--mb` MiB of fp32 weights takes `--steps` Adam steps on random
gradients; after each, the version the trainer would push (its weights converted to the served
dtype) is compared with the one before, and every tensor is encoded as the trainer's cost model
chooses on a link of `--link-gbit` (trainer_service/encoding_choice.py, the link rate set
instead of measured). Averaged over steps 10 to the last, it prints

    wire step=<case> link=1gbit bytes_ratio=X freshness_ratio=Y encode_gbps=Z

- bytes_ratio: wire bytes over the whole tensors of the served dtype (for `fp32_served_bf16`,
  over whole fp32 tensors: what the served dtype alone saves);
- freshness_ratio: the time a push takes now (measured encode and decode seconds, plus the wire
  bytes at the link rate) over today's push of whole fp32 tensors; below 1 is fresher;
- encode_gbps: dense tensor bytes per second through the encoder (choice included).

Cases: `bf16_adam_lr1e-6` (served bf16, a few percent of elements move per step),
`fp32_adam_lr1e-3` (served fp32, most elements move) and `fp32_served_bf16` (Adam lr 1e-4,
served bf16). First, each encoder's own speed on 128 MiB of bf16 with 3% of elements changed:

    encoder encoding=sparse changed=3% encode_gbps=Z decode_gbps=W

(numpy runs on one core; zstd compresses on several threads.)

    python -m bench.encodings [--mb 256] [--steps 20] [--link-gbit 1]

`--lab` measures the same cases across the host lab (bench/hostlab.py, root): a trainer host
and `--replicas` replica hosts on `--rate` links, each replica an inference service serving
this module's `lab_app` (the model as `lab_bf16`, served in bf16, and `lab_fp32`). Inside the
trainer host a Publisher (`--push-encoding auto`, chain fan-out) pushes each step's state,
converted to the served dtype, and a client polls every replica's ModelMetadata; freshness is
measured, from `sync()` called to every replica serving the version, averaged over steps 10 to
the last, and compared with pushes of whole fp32 tensors (`--push-encoding whole`) of the same
steps: after each measured step (before it, every other step) another writer pushes the same
trained weights whole in fp32 to a third model, `lab_whole`, so a load that drifts during the
run weighs on both alike (`--baseline` whole pushes warm that model up first). encode_gbps is
the trainer's own (dense bytes through the encoder over its seconds, from its metrics).
`--cases` picks cases; `--logs DIR` keeps the replicas' logs (INFO) and the trainer's (DEBUG).

    python -m bench.encodings --lab [--mb 256] [--steps 20] [--replicas 3] [--rate 1gbit]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.encodings_model import CASES, lab_app, selected
from bench.encodings_offline import encoder_speeds, measure
from shared.allocator import tune_for_streaming
from shared.settings import ProcessSettings

__all__ = ["lab_app", "main"]  # lab_app: what the replica hosts serve in --lab


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="fp32 model size in MiB")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (>= 11)")
    parser.add_argument("--link-gbit", type=float, default=1.0, help="link rate in Gbit/s")
    parser.add_argument("--verbose", action="store_true", help="each step's encodings")
    parser.add_argument("--lab", action="store_true", help="measure across the host lab")
    parser.add_argument("--replicas", type=int, default=3, help="--lab: replica hosts")
    parser.add_argument("--rate", default="1gbit", help="--lab: every link's rate")
    parser.add_argument("--baseline", type=int, default=4, help="--lab: whole fp32 pushes")
    parser.add_argument(
        "--push-encoding", default="auto", help="--lab: the trainer's --push-encoding"
    )
    parser.add_argument(
        "--logs", type=Path, help="--lab: keep the replicas' logs (INFO) and the trainer's (DEBUG)"
    )
    parser.add_argument(
        "--cases", help=f"only these cases, comma-separated (of {', '.join(c.name for c in CASES)})"
    )
    parser.add_argument("--lab-drive", help=argparse.SUPPRESS)  # the trainer side, in the lab
    args = parser.parse_args()
    if args.lab_drive:
        from bench.encodings_trainer import lab_drive  # the trainer side: not in the replicas

        return lab_drive(json.loads(args.lab_drive))
    if args.lab:
        from bench.encodings_lab import lab_run

        return lab_run(args)
    link = args.link_gbit * 1e9 / 8
    # malloc tuned as both services tune it (shared/allocator.py): untuned, every encode of a
    # large tensor faults its fresh output arrays in, which neither service pays
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "bench").malloc)
    encoder_speeds()
    print(f"model: {args.mb} MiB of fp32 weights; steps 10 to {args.steps} measured")
    for case in selected(args.cases):
        print(measure(case, args.mb, max(args.steps, 11), link, args.verbose), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
