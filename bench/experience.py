"""Experience-plane figures: samples into a trainer against a raw gRPC stream, and how long a
collected sample takes to become a trained version that is served.

    experience ratio_vs_raw=X samples_per_s=N mb_per_s=M
        N, M: samples (and their payload MB) a RemoteDataCollector in this process gets
              acknowledged by a trainer service (its experience plane, real process) per second,
              from the first collect() to the end of flush()
        X:    that throughput over the same bytes (each batch of samples in an experience.v1
              Batch, within a few bytes of the collector's own framing: as many messages, of
              the same sizes, with the same gRPC options) streamed over a raw grpcio
              bidirectional stream to a server process that only counts their bytes and answers
              each with an ack, in the same run
    experience raw_ceiling samples_per_s=R mb_per_s=S
        that yardstick's own figures: the ceiling the collector is measured against
    experience trainer_cpu_us_per_sample=T raw_server_cpu_us_per_sample=U
        CPU time (user and system, every thread) the trainer process spent per sample during
        the throughput runs of ours, and the raw server process during the raw runs
    experience replay ratio_vs_raw=Y trainer_cpu_us_per_sample=V
        the trainer alone: the same samples, laid out as a RemoteDataCollector lays out full
        batches (built beforehand), sent by the raw client to the trainer's experience plane;
        Y its throughput over the raw yardstick's, V the trainer's CPU time per sample
    experience rows ratio_vs_raw=Z samples_per_s=N
        the same samples collected `--rows` at a time with collect_rows() (an agent stepping a
        vectorised environment), one copy per tensor per call instead of per sample, over the
        same raw yardstick
    experience collect_us_per_sample=C agent_cpu_us_per_sample=D
        C: the time the agent's collect() calls took (median run); D: the CPU time (user and
        system, every thread) the agent's process spent from its first collect() to the end
        of flush(): collect() and the sending threads
    experience collect_to_served_ms p50=A max=B
        from the collect() that completes a trainer's training condition (min_new_data_count)
        to the inference service serving the version that run pushed

    python -m bench.experience [--samples 20000] [--dim 1024] [--batch 64] [--rows 64]
        [--repeat 3] [--rounds 5]

Throughput runs are interleaved (ours, raw, ours, ...) and reported as medians. The trainer
service runs `bench.experience:app`: a buffer `bulk` that no trainer reads (throughput), and a
buffer `steps` whose trainer runs once `--condition` new samples arrived (latency).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
from torch import nn
from typing_extensions import override

from bench.experience_raw import BATCH, MAX_MESSAGE, laid_out, raw
from devtools import launch
from shared import App, DictSequentialBuffer, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.data.batch import encode_batch
from shared.data.remote import RemoteDataCollector
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.options import channel_options
from shared.torch.trainer import OptimizersSetup

ROOT = Path(__file__).resolve().parent.parent
DIM = 1024  # floats per observation; the trainer's app is built for it (BENCH_EXPERIENCE_DIM)
CONDITION = 64  # new samples that make the latency trainer run
COLLECT_S: list[float] = []  # how long each throughput run's collect() calls took together
AGENT_CPU_S: list[float] = []  # the CPU time this process (the agent) spent in each of them


def dim() -> int:
    import os

    return int(os.environ.get("BENCH_EXPERIENCE_DIM", DIM))


class StepsTrainer(TorchTrainer):
    """A few SGD steps on the newest samples, once CONDITION new ones arrived."""

    def __init__(self) -> None:
        super().__init__("steps", min_buffer_size=CONDITION, min_new_data_count=CONDITION)

    @override
    def on_training_models_attached(self) -> None:
        self.policy = self.get_torch_training_model("policy", nn.Linear)

    @override
    def on_data_users_attached(self) -> None:
        self.steps = self.get_data_user("steps")

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.policy.model.parameters(), lr=1e-3)}

    @override
    def train(self) -> None:
        data = self.steps.get_data()
        obs, target = (
            torch.stack(data["obs"][-CONDITION:]),
            torch.stack(data["target"][-CONDITION:]),
        )
        loss = nn.functional.mse_loss(self.policy(obs), target)
        self.optimizers["sgd"].zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizers["sgd"].step()


def sample_tensors() -> list[TensorSpec]:
    return [TensorSpec("obs", "FP32", (dim(),)), TensorSpec("target", "FP32", (1,))]


app = App()
app.add_model(
    "policy",
    lambda: TorchTrainingModel(nn.Linear(dim(), 1)),
    inputs=[TensorSpec("obs", "FP32", (-1, dim()))],
    outputs=[TensorSpec("target", "FP32", (-1, 1))],
)
app.add_buffer(
    "bulk", lambda: DictSequentialBuffer(["obs", "target"], 4096), tensors=sample_tensors()
)
app.add_buffer(
    "steps", lambda: DictSequentialBuffer(["obs", "target"], 4096), tensors=sample_tensors()
)
app.add_trainer("steps", StepsTrainer)


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system, every thread) process `pid` has spent so far."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def samples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(count, dim(), generator=generator)
    return [{"obs": obs[i], "target": obs[i, :1].clone()} for i in range(count)]


def ours(
    address: str,
    items: list[dict[str, torch.Tensor]],
    batch: int = BATCH,
    rows: list[dict[str, torch.Tensor]] | None = None,
) -> float:
    """Seconds from the first collect() of `items` (or collect_rows() of `rows`, the same
    samples stacked) to the end of flush()."""
    total = sum(t.nbytes for item in items for t in item.values())
    with RemoteDataCollector(  # room for every sample: the run measures speed, not drops
        address, "bulk", batch_size=batch, max_pending=len(items) + 1, max_pending_bytes=total + 1
    ) as collector:
        cpu = time.process_time()
        started = time.perf_counter()
        if rows is None:
            for item in items:
                collector.collect(item)
        else:
            for stacked in rows:
                collector.collect_rows(stacked)
        collected = time.perf_counter() - started
        assert collector.flush(timeout=600)
        took = time.perf_counter() - started
        if rows is None:
            AGENT_CPU_S.append(time.process_time() - cpu)
            COLLECT_S.append(collected)
        stats = collector.stats
    assert (stats.acknowledged, stats.dropped) == (len(items), 0), stats
    return took


def stacked(items: list[dict[str, torch.Tensor]], rows: int) -> list[dict[str, torch.Tensor]]:
    """`items` as an agent stepping `rows` environments at once holds them: each tensor's
    `rows` samples stacked."""
    return [
        {name: torch.stack([item[name] for item in items[i : i + rows]]) for name in items[0]}
        for i in range(0, len(items), rows)
    ]


def served_version(client: object) -> int:
    from inference_service.client import InferenceClient

    assert isinstance(client, InferenceClient)
    result = client.infer("policy", {"obs": torch.zeros(1, dim())})
    return result.version


def latency(address: str, data: str, rounds: int) -> list[float]:
    """Seconds from the collect() that completes the training condition to its version being
    served, `rounds` times."""
    from inference_service.client import InferenceClient

    found = []
    with (
        RemoteDataCollector(address, "steps", batch_size=CONDITION, max_delay_s=0.001) as collector,
        InferenceClient(data) as client,
    ):
        for round_ in range(rounds):
            before = served_version(client)
            for item in samples(CONDITION, 1000 + round_):
                collector.collect(item)
            started = time.perf_counter()
            while served_version(client) <= before:
                time.sleep(0.002)
            found.append(time.perf_counter() - started)
            assert collector.flush(timeout=60)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000, help="samples per throughput run")
    parser.add_argument("--dim", type=int, default=DIM, help="floats per observation")
    parser.add_argument(
        "--batch", type=int, default=BATCH, help="samples per batch (message), ours and raw alike"
    )
    parser.add_argument(
        "--rows", type=int, default=64, help="samples per collect_rows() call in the rows runs"
    )
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs each (median)")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    args = parser.parse_args()
    import os

    os.environ["BENCH_EXPERIENCE_DIM"] = str(args.dim)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    items = samples(args.samples, 0)
    by_rows = stacked(items, args.rows)
    messages = [
        pb.Batch(
            buffer="bulk",
            sequence=n + 1,
            payload=encode_batch(items[i : i + args.batch]),
            collector_id="raw",
        ).SerializeToString()
        for n, i in enumerate(range(0, len(items), args.batch))
    ]
    payload_mb = sum(len(m) for m in messages) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        launcher = launch.Launcher(Path(tmp), env, logs=False, grace=30)
        try:
            inference = launcher.start_inference("bench.experience:app", *launch.QUIET)
            experience = launcher.start_experience_trainer(
                "bench.experience:app",
                [inference.sync],
                "--experience-max-batch",
                "64MiB",
                *launch.QUIET,
                timeout=120,
            )
            trainer_pid = launcher.processes[-1].pid
            port_file = Path(tmp) / "raw.port"
            server = launcher.spawn(
                [sys.executable, "-m", "bench.experience_raw", str(port_file)], "raw"
            )
            port = launch.wait_for(
                server,
                lambda: port_file.read_text() if port_file.exists() else "",
                what="the raw server",
                timeout=120,
            )
            channel = grpc.insecure_channel(
                f"127.0.0.1:{port}", options=channel_options(MAX_MESSAGE)
            )
            ours_s: list[float] = []
            rows_s: list[float] = []
            raw_s: list[float] = []
            trainer_cpu = raw_cpu = replay_cpu = 0.0
            replay_s: list[float] = []
            replayed = 0
            trainer_channel = grpc.insecure_channel(
                experience, options=channel_options(MAX_MESSAGE)
            )
            for run in range(args.repeat):
                replay = laid_out(items, args.batch, f"replay-{run}")
                before = cpu_s(trainer_pid)
                replay_s.append(raw(trainer_channel, replay, "/experience.v1.Experience/Collect"))
                replay_cpu += cpu_s(trainer_pid) - before
                replayed = len(replay) * args.batch
                before = cpu_s(trainer_pid)
                ours_s.append(ours(experience, items, args.batch))
                trainer_cpu += cpu_s(trainer_pid) - before
                before = cpu_s(server.pid)
                raw_s.append(raw(channel, messages))
                raw_cpu += cpu_s(server.pid) - before
                rows_s.append(ours(experience, items, args.batch, by_rows))
            channel.close()
            trainer_channel.close()
            took, took_raw = statistics.median(ours_s), statistics.median(raw_s)
            print(
                f"experience ratio_vs_raw={took_raw / took:.2f} "
                f"samples_per_s={args.samples / took:.0f} mb_per_s={payload_mb / took:.1f}"
            )
            print(
                f"experience raw_ceiling samples_per_s={args.samples / took_raw:.0f} "
                f"mb_per_s={payload_mb / took_raw:.1f} (the same Batch bytes, pre-built, over a "
                "bare grpcio stream to a server that only counts their bytes and acknowledges them)"
            )
            per_sample = 1e6 / (args.samples * args.repeat)
            print(
                f"experience trainer_cpu_us_per_sample={trainer_cpu * per_sample:.1f} "
                f"raw_server_cpu_us_per_sample={raw_cpu * per_sample:.1f} (CPU time of the "
                "trainer process during our runs, of the raw server during the raw runs)"
            )
            took_replay = statistics.median(replay_s) / replayed * args.samples
            print(
                f"experience replay ratio_vs_raw={took_raw / took_replay:.2f} "
                f"trainer_cpu_us_per_sample={replay_cpu * 1e6 / (replayed * args.repeat):.1f} "
                "(the agent's full batches, pre-built, sent by the raw client to the trainer)"
            )
            took_rows = statistics.median(rows_s)
            print(
                f"experience rows ratio_vs_raw={took_raw / took_rows:.2f} "
                f"samples_per_s={args.samples / took_rows:.0f} (collect_rows() of {args.rows} "
                "samples a call: an agent stepping a vectorised environment)"
            )
            agent_cpu = statistics.median(AGENT_CPU_S) / args.samples
            print(
                f"experience collect_us_per_sample="
                f"{statistics.median(COLLECT_S) / args.samples * 1e6:.1f} "
                f"agent_cpu_us_per_sample={agent_cpu * 1e6:.1f} "
                "(the time the agent's collect() calls took, and the CPU time, every thread, the "
                "agent's process spent from the first collect() to the end of flush())"
            )
            waits = latency(experience, inference.data, args.rounds)
            print(
                f"experience collect_to_served_ms p50={statistics.median(waits) * 1e3:.0f} "
                f"max={max(waits) * 1e3:.0f}"
            )
        except launch.NotReadyError as exc:
            raise SystemExit(str(exc)) from None
        finally:
            for process in reversed(launcher.processes):
                launch.stop(process, 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
