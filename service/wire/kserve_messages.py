"""Served models described as KServe v2 / Triton messages (metadata, config, statistics)."""

from __future__ import annotations

from model_format import DENSE_FILE, MODEL_FILE
from service._generated.inference import grpc_service_pb2 as pb
from service.engine.repository import ModelRepository, ServedModel
from service.engine.statistics import Duration

__all__ = [
    "merge_statistics",
    "model_config",
    "model_metadata",
    "model_statistics",
    "repository_index",
]

PLATFORM = "onnxruntime_onnx"


def model_metadata(model: ServedModel, versions: list[int]) -> pb.ModelMetadataResponse:
    """ModelMetadata: every tensor with its full shape (batch axis -1 when batching)."""
    response = pb.ModelMetadataResponse(
        name=model.name, platform=PLATFORM, versions=[str(v) for v in versions]
    )
    for target, specs in ((response.inputs, model.inputs), (response.outputs, model.outputs)):
        for spec in specs:
            target.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    return response


def model_config(model: ServedModel) -> pb.ModelConfigResponse:
    """ModelConfig in Triton's terms; with batching, dims leave the batch axis out.

    ``parameters`` name the precision the file is stored in (``precision``: ``fp32``, ``fp16``
    or ``int8``) and, for a dense twin, its geometry (``dense_stride``, ``dense_window``).

    A model served without a batch axis (max_batch_size 0) has no dynamic_batching, as Triton
    requires: clients such as perf_analyzer read its presence as "requests are batched".
    """
    skip = 1 if model.max_batch_size > 0 else 0
    batching = model.config.batching
    config = pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=model.max_batch_size,
        default_model_filename=(DENSE_FILE if model.dense else MODEL_FILE),
    )
    if model.max_batch_size > 0:
        config.dynamic_batching.CopyFrom(
            pb.ModelDynamicBatching(
                preferred_batch_size=list(batching.preferred_batch_size),
                max_queue_delay_microseconds=batching.max_queue_delay_microseconds,
                default_queue_policy=pb.ModelQueuePolicy(
                    max_queue_size=batching.max_queue_size,
                    default_timeout_microseconds=batching.default_timeout_microseconds,
                ),
            )
        )
    config.instance_group.add(
        count=model.config.instances,
        kind=pb.ModelInstanceGroup.KIND_GPU
        if model.runtime.on_cuda
        else pb.ModelInstanceGroup.KIND_CPU,
    )
    policy = model.config.versions
    if policy.kind == "all":
        config.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        config.version_policy.specific.versions.extend(policy.versions)
    else:
        config.version_policy.latest.num_versions = policy.num_versions
    for spec in model.inputs:
        layout = (
            pb.ModelInput.FORMAT_NCHW
            if model.info.layout == "NCHW"
            else (pb.ModelInput.FORMAT_NONE)
        )
        config.input.add(
            name=spec.name,
            data_type=_data_type(spec.datatype),
            format=layout,
            dims=list(spec.shape[skip:]),
        )
    for spec in model.outputs:
        config.output.add(
            name=spec.name, data_type=_data_type(spec.datatype), dims=list(spec.shape[skip:])
        )
    config.parameters["precision"].string_value = model.precision
    if model.info.dense is not None:
        geometry = model.info.dense
        config.parameters["dense_stride"].string_value = ",".join(map(str, geometry.stride))
        config.parameters["dense_window"].string_value = ",".join(map(str, geometry.window))
    return pb.ModelConfigResponse(config=config)


def _data_type(datatype: str) -> int:
    return int(pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


def _duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def model_statistics(models: list[ServedModel]) -> pb.ModelStatisticsResponse:
    """ModelStatistics for the given served versions."""
    response = pb.ModelStatisticsResponse()
    for model in models:
        stats = model.stats
        entry = response.model_stats.add(
            name=model.name,
            version=str(model.version),
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
            inference_stats=pb.InferStatistics(
                success=_duration(stats.success),
                fail=_duration(stats.fail),
                queue=_duration(stats.queue),
                compute_input=_duration(stats.compute_input),
                compute_infer=_duration(stats.compute_infer),
                compute_output=_duration(stats.compute_output),
            ),
        )
        for size, batch in sorted(stats.batches.items()):
            entry.batch_stats.add(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
    return response


def _add_durations(total: pb.InferStatistics | pb.InferBatchStatistics, part: object) -> None:
    """Add every StatisticDuration field of ``part`` to the same field of ``total``."""
    for field in total.DESCRIPTOR.fields:
        if field.message_type is pb.StatisticDuration.DESCRIPTOR:
            into, value = getattr(total, field.name), getattr(part, field.name)
            into.count += value.count
            into.ns += value.ns


def merge_statistics(parts: list[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    """Several workers' ModelStatistics as one server's.

    Counts and durations are summed per version and batch size, the latest inference is kept,
    and versions come in the order first seen.
    """
    merged = pb.ModelStatisticsResponse()
    entries: dict[tuple[str, str], pb.ModelStatistics] = {}
    batches: dict[tuple[str, str], dict[int, pb.InferBatchStatistics]] = {}
    for part in parts:
        for stats in part.model_stats:
            key = (stats.name, stats.version)
            if key not in entries:
                entries[key] = merged.model_stats.add(name=stats.name, version=stats.version)
                batches[key] = {}
            entry = entries[key]
            entry.last_inference = max(entry.last_inference, stats.last_inference)
            entry.inference_count += stats.inference_count
            entry.execution_count += stats.execution_count
            _add_durations(entry.inference_stats, stats.inference_stats)
            for batch in stats.batch_stats:
                size = batches[key].setdefault(
                    batch.batch_size, pb.InferBatchStatistics(batch_size=batch.batch_size)
                )
                _add_durations(size, batch)
    for key, entry in entries.items():
        entry.batch_stats.extend(batches[key][size] for size in sorted(batches[key]))
    return merged


def repository_index(repository: ModelRepository, ready_only: bool) -> pb.RepositoryIndexResponse:
    """RepositoryIndex: every model on disk with its state."""
    response = pb.RepositoryIndexResponse()
    for name, version, state, reason in repository.index():
        if not ready_only or state == "READY":
            response.models.add(name=name, version=version, state=state, reason=reason)
    return response
