"""Triton-extension messages (ModelConfig, ModelStatistics, RepositoryIndex) from the data
plane's domain state."""

from __future__ import annotations

from inference_service.dataplane.service import DataPlane
from inference_service.dataplane.stats import Duration
from inference_service.served_model import ServedModel
from shared.dtypes import BYTES
from shared.gen.inference import grpc_service_pb2 as pb

PLATFORM = "pytorch"


def _type(datatype: str) -> pb.DataType:
    """The ModelConfig enum for an OIP datatype (BYTES is Triton's TYPE_STRING)."""
    value: pb.DataType = pb.DataType.Value(
        "TYPE_STRING" if datatype == BYTES else f"TYPE_{datatype}"
    )
    return value


def model_config(data: DataPlane, model: ServedModel) -> pb.ModelConfig:
    batched = data.is_batched(model.name) and data.batching is not None
    config = pb.ModelConfig(name=model.name, platform=PLATFORM, backend="weightsync")
    if batched and data.batching is not None:
        config.max_batch_size = data.batching.max_batch_size
        config.dynamic_batching.max_queue_delay_microseconds = int(
            data.batching.max_queue_delay_s * 1e6
        )
    for spec in model.spec.inputs:
        dims = spec.shape[1:] if batched else spec.shape
        config.input.add(name=spec.name, data_type=_type(spec.datatype), dims=dims)
    for spec in model.spec.outputs:
        dims = spec.shape[1:] if batched else spec.shape
        config.output.add(name=spec.name, data_type=_type(spec.datatype), dims=dims)
    return config


def _duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def model_statistics(data: DataPlane, model: ServedModel) -> pb.ModelStatistics:
    stats = data.stats.snapshot(model.name)
    return pb.ModelStatistics(
        name=model.name,
        version=str(model.live.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_infer=_duration(stats.compute),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(duration))
            for size, duration in sorted(stats.by_batch_size.items())
        ],
    )


def repository_index(data: DataPlane, ready_only: bool) -> pb.RepositoryIndexResponse:
    """Every served model at its live version. Readiness is the server's: a model is ready once
    the service has warmed every model up, until it starts draining."""
    index = pb.RepositoryIndexResponse.ModelIndex
    models = [data.models[name] for name in sorted(data.models)]
    if data.ready:
        entries = [index(name=m.name, version=str(m.live.version), state="READY") for m in models]
    elif ready_only:
        entries = []
    else:
        reason = "the service is starting (warm-up) or shutting down"
        entries = [
            index(name=m.name, version=str(m.live.version), state="UNAVAILABLE", reason=reason)
            for m in models
        ]
    return pb.RepositoryIndexResponse(models=entries)
