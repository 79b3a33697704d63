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
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from shared.weights.encoding import ENCODINGS, decode, encode
from shared.weights.served import served_state
from trainer_service.encoding_choice import EncodingChooser, host_bytes

TARGET = "10.0.0.1:50052"  # a name for the link; nothing is dialled
TENSOR_MB = 16  # the model is cut into tensors of this size


@dataclass(frozen=True)
class Case:
    name: str
    lr: float
    served: torch.dtype | None  # None: as trained (fp32)
    versus_fp32: bool  # bytes_ratio against whole fp32 tensors rather than served ones


CASES = (
    Case("bf16_adam_lr1e-6", 1e-6, torch.bfloat16, False),
    Case("fp32_adam_lr1e-3", 1e-3, None, False),
    Case("fp32_served_bf16", 1e-4, torch.bfloat16, True),
)


def weights(mb: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    count = max(1, mb // TENSOR_MB)
    per = min(mb, TENSOR_MB) * (1 << 20) // 4
    return [torch.nn.Parameter(torch.randn(per) * 0.02) for _ in range(count)]


def encoder_speeds(elements: int = 64 << 20, changed: float = 0.03) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1 << 16, elements, dtype=np.uint16)
    new = base.copy()
    moved = rng.random(elements) < changed
    new[moved] ^= rng.integers(1, 1 << 8, int(moved.sum()), dtype=np.uint16)
    new_bytes, base_bytes = new.view(np.uint8), base.view(np.uint8)
    out = np.empty_like(new_bytes)
    for encoding in ENCODINGS:
        began = time.perf_counter()
        data = encode(encoding, new_bytes, base_bytes, 2)
        encoded = time.perf_counter() - began
        assert data is not None
        began = time.perf_counter()
        decode(encoding, data, base_bytes, 2, out)
        decoded = time.perf_counter() - began
        assert out.tobytes() == new_bytes.tobytes()
        print(
            f"encoder encoding={encoding} changed={changed:.0%} "
            f"encode_gbps={new_bytes.nbytes / encoded / 1e9:.2f} "
            f"decode_gbps={new_bytes.nbytes / decoded / 1e9:.2f} "
            f"bytes_ratio={len(data) / new_bytes.nbytes:.4f}",
            flush=True,
        )


def measure(case: Case, mb: int, steps: int, link: float, verbose: bool = False) -> str:
    params = weights(mb)
    optimizer = torch.optim.Adam(params, lr=case.lr)
    chooser = EncodingChooser("auto")
    chooser.record_push(TARGET, 1 << 30, (1 << 30) / link)  # the link rate, as if measured
    chooser.calibrate()  # once per trainer, not per push
    g = torch.Generator().manual_seed(1)
    previous: dict[str, torch.Tensor] | None = None
    wire = whole = fp32 = dense = 0
    seconds = encode_seconds = 0.0
    for step in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        state = {f"w{i}": p.detach() for i, p in enumerate(params)}
        version = {k: v.clone() for k, v in served_state(state, case.served).items()}
        if previous is not None and step >= 10:
            changed = [(k, v) for k, v in version.items() if not torch.equal(v, previous[k])]
            encoded = chooser.encode(TARGET, changed, previous)
            if verbose:
                print(f"  step {step}: {encoded.summary()} in {encoded.seconds:.3f}s")
            decode_seconds = 0.0
            sent = 0
            for name, tensor in changed:
                nbytes = tensor.numel() * tensor.element_size()
                if name not in encoded.tensors:
                    sent += nbytes
                    continue
                encoding, data = encoded.tensors[name]
                sent += len(data)
                out = np.empty(nbytes, np.uint8)
                began = time.perf_counter()
                decode(encoding, data, host_bytes(previous[name]), tensor.element_size(), out)
                decode_seconds += time.perf_counter() - began
                assert out.tobytes() == host_bytes(tensor).tobytes(), name
            step_whole = sum(t.numel() * t.element_size() for t in version.values())
            step_fp32 = sum(t.numel() * 4 for t in state.values())
            wire += sent
            whole += step_whole
            fp32 += step_fp32
            dense += sum(t.numel() * t.element_size() for _, t in changed)
            encode_seconds += encoded.seconds
            seconds += encoded.seconds + sent / link + decode_seconds
        previous = version
    bytes_ratio = wire / (fp32 if case.versus_fp32 else whole)
    freshness = seconds / (fp32 / link)
    gbps = dense / max(encode_seconds, 1e-9) / 1e9
    return (
        f"wire step={case.name} link={link * 8 / 1e9:g}gbit bytes_ratio={bytes_ratio:.4f} "
        f"freshness_ratio={freshness:.4f} encode_gbps={gbps:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="fp32 model size in MiB")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (>= 11)")
    parser.add_argument("--link-gbit", type=float, default=1.0, help="link rate in Gbit/s")
    parser.add_argument("--verbose", action="store_true", help="each step's encodings")
    args = parser.parse_args()
    link = args.link_gbit * 1e9 / 8
    encoder_speeds()
    print(f"model: {args.mb} MiB of fp32 weights; steps 10 to {args.steps} measured")
    for case in CASES:
        print(measure(case, args.mb, max(args.steps, 11), link, args.verbose), flush=True)


if __name__ == "__main__":
    main()
