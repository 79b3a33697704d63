"""Sync-engine figures, as ratios against yardsticks measured in the same run.

Trainer side in this process (the trainer service's Publisher), inference service and yardstick
receiver in their own processes, all on loopback:

    full_sync_1GiB ratio_vs_raw=X ratio_vs_naive=Y
        X: our full push's throughput over the same bytes streamed raw through grpcio
        Y: ours over the common path (torch.save to bytes, chunked stream, torch.load,
           load_state_dict)
    delta_sync changed=10% wire_ratio=Z          payload bytes of the delta / of a full push
    delta_sync sgd_step_fp32 wire_ratio=W        the same after one SGD step on every tensor
    inference_peak_rss_ratio=R                   inference process peak extra RSS during the
                                                 first full sync / model size (its sync
                                                 relay process counted in)

    python -m bench.sync [--mb 1024] [--tensors 64] [--repeat 6] [--device cpu]

The service runs with `--sync-relay auto` (INFERENCE_SYNC_RELAY=on or off in the environment
chooses). `--device cuda` holds the inference service's model on the GPU, so the full push
includes the staging copies to the device (the yardsticks still end in host memory).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch

from bench.apps import Blocks, TiedLM
from devtools import launch
from shared.allocator import tune_for_streaming
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES, channel_options
from shared.settings import ProcessSettings
from shared.weights.digest import byte_view
from shared.weights.writer import Payload
from trainer_service.publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1 << 20


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


class PeakRss:
    """Peak resident memory of processes together over a window (their summed RSS, sampled,
    and the sum of their VmHWMs where those can be reset, which bounds it from above)."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _total(self, field: str) -> int:
        return sum(rss_kib(pid, field) for pid in self.pids)

    def __enter__(self) -> PeakRss:
        try:  # reset VmHWM so it covers only this window
            for pid in self.pids:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.before = self._total("VmRSS")
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.hwm:
            self.peak = max(self.peak, self._total("VmHWM"))

    @property
    def extra_bytes(self) -> int:
        return (self.peak - self.before) * 1024


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def raw_chunks(state: dict[str, torch.Tensor]) -> Iterator[bytes]:
    for tensor in state.values():
        view = byte_view(tensor)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])


def naive_chunks(state: dict[str, torch.Tensor]) -> Iterator[bytes]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blob = buffer.getbuffer()
    for start in range(0, len(blob), CHUNK):
        yield bytes(blob[start : start + CHUNK])


def tied_sync(launcher: launch.Launcher) -> None:
    """A tied LM's full push (a service of its own, started once the timed figures are done)
    against the same push with every state-dict name carried."""
    inference = launcher.start_inference("bench.apps:tied_app", *launch.QUIET, name="tied")
    publisher = Publisher([inference.sync], "bench")
    lm = TiedLM()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_()
    state = lm.state_dict()
    tied = publisher.publish("tiedlm", state, full=True)
    publisher.close()
    every_name = Payload.of(list(state.items())).nbytes
    print(
        f"tied_sync full wire_ratio={tied.payload_bytes / every_name:.4f}"
        f"  # a tied LM ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M "
        "parameters, head tied to the embedding) against each of its names sent"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="sync-engine figures against yardsticks")
    parser.add_argument("--mb", type=int, default=1024, help="model size in MiB")
    parser.add_argument("--tensors", type=int, default=64, help="number of equal tensors")
    parser.add_argument("--repeat", type=int, default=6, help="runs per figure (median)")
    parser.add_argument("--device", default="cpu", help="the inference service's device")
    args = parser.parse_args()
    # as the trainer service does; this process sends for all three
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "bench").malloc)
    env = {
        **os.environ,
        "BENCH_MB": str(args.mb),
        "BENCH_TENSORS": str(args.tensors),
        "PYTHONPATH": str(ROOT),
    }
    torch.manual_seed(0)
    model = Blocks(args.mb, args.tensors)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())

    with tempfile.TemporaryDirectory() as tmp:
        # Nothing is served here, so the sync plane's lower CPU priority (--sync-nice, which
        # makes pushes yield to serving) has nothing to protect; left on, it would only make the
        # receiver yield to this co-located sender, which a real trainer on its own host is not.
        launcher = launch.Launcher(Path(tmp), env, logs=False, grace=60)
        try:
            inference = launcher.start_inference(
                "bench.apps:app",
                *launch.QUIET,
                "--sync-nice",
                "0",
                "--device",
                args.device,
                timeout=300,
            )
            port_file = Path(tmp) / "yardstick.port"
            yardstick = launcher.spawn(
                [sys.executable, "-m", "bench.yardstick_server", str(port_file)], "yardstick"
            )
            port = launch.wait_for(
                yardstick,
                lambda: port_file.read_text() if port_file.exists() else "",  # "": not written yet
                what="the yardstick server",
                timeout=300,
            )
            sync_address = inference.sync
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port}",
                options=channel_options(SYNC_MAX_MESSAGE_BYTES),
            )
            raw = channel.stream_unary("/bench.Yardstick/Raw")
            naive = channel.stream_unary("/bench.Yardstick/Naive")

            # One publisher throughout, as a trainer keeps its channels (the raw yardstick's
            # channel is reused too). First full push, under the memory probe: it allocates
            # the inference standby copy.
            publisher = Publisher([sync_address], "bench")
            receivers = [inference.process.pid, *filter(None, [inference.relay_pid])]
            with PeakRss(*receivers) as probe:
                publisher.publish("blocks", state)

            def full_push() -> None:
                publisher.publish("blocks", state, full=True)

            # Interleaved, so drift on a noisy machine hits all three alike, and in a rotating
            # order, so none always runs right after the naive path's gigabytes of allocation
            # and freeing; medians.
            contenders: dict[str, Callable[[], object]] = {
                "ours": full_push,
                "raw": lambda: raw(raw_chunks(state), timeout=600),
                "naive": lambda: naive(naive_chunks(state), timeout=600),
            }
            runs: dict[str, list[float]] = {name: [] for name in contenders}
            order = list(contenders)
            for repeat in range(args.repeat):
                for name in order[repeat % 3 :] + order[: repeat % 3]:
                    runs[name].append(timed(contenders[name]))
            ours, raw_s, naive_s = (statistics.median(runs[k]) for k in ("ours", "raw", "naive"))
            print(
                f"# model {model_bytes / 2**30:.2f} GiB in {args.tensors} fp32 tensors, served "
                f"on {args.device}; "
                f"ours {model_bytes / ours / 1e9:.2f} GB/s, raw {model_bytes / raw_s / 1e9:.2f} "
                f"GB/s, naive {model_bytes / naive_s / 1e9:.2f} GB/s (median of {args.repeat})"
            )
            label = f"{args.mb // 1024}GiB" if args.mb % 1024 == 0 else f"{args.mb}MiB"
            print(
                f"full_sync_{label} ratio_vs_raw={raw_s / ours:.2f} "
                f"ratio_vs_naive={naive_s / ours:.2f}"
            )

            full = publisher.publish("blocks", state, full=True)
            changed = max(1, round(args.tensors * 0.10))
            with torch.no_grad():
                for tensor in list(state.values())[:changed]:
                    tensor.add_(1.0)
            delta = publisher.publish("blocks", state)
            print(
                f"delta_sync changed=10% wire_ratio={delta.payload_bytes / full.payload_bytes:.4f}"
                f"  # {changed} of {args.tensors} tensors"
            )

            params = [torch.nn.Parameter(t) for t in state.values()]
            optimizer = torch.optim.SGD(params, lr=1e-3)
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            step = publisher.publish(
                "blocks", {k: p.detach() for k, p in zip(state, params, strict=True)}
            )
            print(
                f"delta_sync sgd_step_fp32 wire_ratio={step.payload_bytes / full.payload_bytes:.4f}"
            )
            publisher.close()
            print(
                f"inference_peak_rss_ratio={probe.extra_bytes / model_bytes:.2f}"
                f"  # {probe.extra_bytes / 2**20:.0f} MiB extra for a {model_bytes / 2**20:.0f}"
                " MiB model, first full sync"
            )
            tied_sync(launcher)
        finally:
            launcher.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
