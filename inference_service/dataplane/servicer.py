"""inference.GRPCInferenceService on grpc.aio: convert, delegate to the DataPlane, convert back.

The event loop only decodes, waits and encodes; models run on the batchers' threads or the data
plane's workers. One loop thread answering every call measured about 1.4 times the throughput of
grpcio's thread-pool server on the serving benchmark (bench/serve.py), whose handler threads
spent their time handing the GIL to one another."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import TypeAlias

import grpc
from prometheus_client import Counter
from typing_extensions import override

from inference_service import metrics
from inference_service.dataplane import convert
from inference_service.dataplane.admission import Ticket
from inference_service.dataplane.codec import decode_inputs
from inference_service.dataplane.extensions import TritonExtensions
from inference_service.dataplane.outputs import encode_into, requested_outputs
from inference_service.dataplane.service import DataPlane
from shared.errors import InvalidArgumentError, ResourceLimitError, ServiceError
from shared.gen.inference import grpc_service_pb2 as pb
from shared.gen.inference import grpc_service_pb2_grpc as pb_grpc
from shared.grpc.errors import grpc_errors_async, status_for, status_of
from shared.grpc.options import DATA_MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)

SERVER_NAME = "weightsync"
PLATFORM = convert.PLATFORM
EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data"]
Context: TypeAlias = grpc.aio.ServicerContext
STREAM_WINDOW = 64  # requests of one ModelStreamInfer stream running at once
# The most bytes of a ModelInferResponse sent on a stream: a message's, less what wraps it in a
# ModelStreamInferResponse (a tag and a length) and the final flag it may add (FINAL).
STREAM_ANSWER_BYTES = DATA_MAX_MESSAGE_BYTES - 64
# A request's id is echoed in its answer, a refused one's too, and every answer waiting on a
# stream holds it: ids of up to a message's size let one stream's window of refused answers hold
# gigabytes that no admission bound counted. An id is a tag (a UUID, a trace id): this is ample.
MAX_REQUEST_ID_BYTES = 4096
# Triton's stream parameters: a request asking to be told which answer is its last, and the flag.
FINAL_ASKED = "triton_enable_empty_final_response"
FINAL = "triton_final_response"
# A stream's request being answered, and its place in admission once it has one.
Pending: TypeAlias = "tuple[asyncio.Task[pb.ModelStreamInferResponse], list[Ticket]]"


class InferenceServicer(TritonExtensions, pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The OIP core, ModelStreamInfer, ModelConfig and ModelStatistics; Triton's other RPCs
    come from `TritonExtensions`."""

    def __init__(self, data_plane: DataPlane, server_version: str) -> None:
        self._data = data_plane
        self._server_version = server_version
        self._counted: dict[tuple[str, str], Counter] = {}  # REQUESTS' children, by labels

    @override
    @grpc_errors_async
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @override
    @grpc_errors_async
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._data.ready)

    @override
    @grpc_errors_async
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._data.model_ready(request.name, request.version))

    @override
    @grpc_errors_async
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._server_version, extensions=EXTENSIONS
        )

    @override
    @grpc_errors_async
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        model = self._data.model(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(model.live.version)],
            platform=PLATFORM,
            inputs=[
                meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.spec.inputs
            ],
            outputs=[
                meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.spec.outputs
            ],
        )

    @override
    @grpc_errors_async
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> bytes:
        # answered serialized: _infer serialized it to check its size (shared/grpc/decoding.py)
        _, data = await self._infer(request, context.time_remaining())
        return data

    @override
    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests run as they arrive, up to STREAM_WINDOW of them at once, so a client that
        # keeps several in flight on one stream gets them batched; answers leave in request
        # order, as Triton's do. Triton's convention too: a failed request answers in-band,
        # with its id, and the stream stays open. Each request keeps its place in admission
        # until its answer is handed to gRPC (or the stream ends): answers a client does not
        # read count against the service's limits.
        answers: asyncio.Queue[Pending | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    held: list[Ticket] = []
                    task = asyncio.ensure_future(self._stream_answer(request, context, held))
                    answers.put_nowait((task, held))
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        pending: Pending | None = None
        try:
            while (pending := await answers.get()) is not None:
                yield await pending[0]
                _release(pending[1])
                pending = None
                window.release()
            await reader  # an unparsable message ends the stream with the reader's status
        finally:
            reader.cancel()
            if pending is not None:
                pending[0].cancel()
                _release(pending[1])
            while not answers.empty():
                if (left := answers.get_nowait()) is not None:
                    left[0].cancel()
                    _release(left[1])

    async def _stream_answer(
        self, request: pb.ModelInferRequest, context: Context, held: list[Ticket]
    ) -> pb.ModelStreamInferResponse:
        try:
            final = _final_asked(request.parameters)
            response, _ = await self._infer(
                request, context.time_remaining(), held, STREAM_ANSWER_BYTES
            )
        except ServiceError as error:
            message = status_of(error).message  # cut as a status message is
        except Exception:
            logger.exception("unhandled error in ModelStreamInfer (id %r)", echoed(request.id))
            message = "internal server error"
        else:
            if final:
                # Every answer here is its request's last (no model is decoupled): say so, as
                # Triton does for a client that asked (tritonclient's enable_empty_final_response)
                # and reads until it sees the flag.
                response.parameters[FINAL].bool_param = True
            return pb.ModelStreamInferResponse(infer_response=response)
        # the id, so that the client knows which request failed (Triton's convention)
        return pb.ModelStreamInferResponse(
            error_message=message, infer_response=pb.ModelInferResponse(id=echoed(request.id))
        )

    @override
    @grpc_errors_async
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        model = self._data.model(request.name, request.version)
        return pb.ModelConfigResponse(config=convert.model_config(self._data, model))

    @override
    @grpc_errors_async
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [self._data.model(request.name, request.version)]
        else:
            models = [self._data.models[name] for name in sorted(self._data.models)]
        return pb.ModelStatisticsResponse(
            model_stats=[convert.model_statistics(self._data, m) for m in models]
        )

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        timeout_s: float | None,
        held: list[Ticket] | None = None,
        most_bytes: int = DATA_MAX_MESSAGE_BYTES,
    ) -> tuple[pb.ModelInferResponse, bytes]:
        """Answer one request: the response, and serialized; with `held`, its place in
        admission (`DataPlane.infer`) is appended there and kept until the caller releases it
        too. An answer of more than `most_bytes` is refused here, where it fails the request
        alone (gRPC, sending it, would end a stream with every request behind it)."""
        data = self._data
        name = request.model_name
        # Only served names become label values: a client's garbage must not grow the series.
        label = name if name in data.models else ""
        code = "INTERNAL"
        try:
            check_request_id(request.id)
            version = request.model_version
            model = data.model(name, version)
            parameters = request.parameters
            inputs = decode_inputs(request, model.spec.inputs)
            requested = requested_outputs(request.outputs, model.spec.outputs)
            recording = data.recorder.plans(model.name, parameters)
            outputs, generation = await data.infer(model, inputs, timeout_s, version, held)
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(generation.version), id=request.id
            )
            if parameters:
                for key, value in parameters.items():  # echoed, as they came
                    response.parameters[key].CopyFrom(value)
            encode_into(
                response,
                outputs,
                model.spec.outputs,
                requested,
                raw=bool(request.raw_input_contents),
            )
            serialized = response.SerializeToString()
            if (size := len(serialized)) > most_bytes:
                raise ResourceLimitError(
                    f"the answer takes {size} bytes, more than a message of the data plane "
                    f"carries ({most_bytes}); send fewer rows per request, or ask for fewer "
                    "outputs"
                )
            if held:  # the answer waits for the client in the request's place: count its bytes
                data.admission.grow(held[0], size)
            if recording:  # served: queued for the recorder's thread, the answer does not wait
                data.recorder.record(recording, inputs, outputs)
            code = "OK"
            return response, serialized
        except ServiceError as error:
            code = status_for(error).name
            raise
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            code = "CANCELLED"
            raise
        finally:
            counter = self._counted.get((label, code))
            if counter is None:
                counter = self._counter(label, code)
            counter.inc()

    def _counter(self, model: str, code: str) -> Counter:
        """REQUESTS' child for `model` and `code`, looked up once (labels() takes a lock and
        builds its key on every call)."""
        counter = self._counted.get((model, code))
        if counter is None:
            counter = self._counted.setdefault((model, code), metrics.REQUESTS.labels(model, code))
        return counter


def _release(held: list[Ticket]) -> None:
    """Give back the places a stream's request holds."""
    for ticket in held:
        ticket.release()


def _final_asked(parameters: Mapping[str, pb.InferParameter]) -> bool:
    """Whether a stream's request asks to be told its answer is its last; InvalidArgumentError
    if it asks with anything but a bool (as Triton refuses it: a client sending "true" as a
    string would otherwise read on for a flag that never comes)."""
    if FINAL_ASKED not in parameters:
        return False
    asked = parameters[FINAL_ASKED]
    if asked.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgumentError(
            f"parameter {FINAL_ASKED!r} must be a bool_param, not "
            f"{asked.WhichOneof('parameter_choice') or 'empty'}"
        )
    return bool(asked.bool_param)


def check_request_id(id: str) -> None:
    """Refuse an id over MAX_REQUEST_ID_BYTES (UTF-8)."""
    if size := _oversized(id):
        raise InvalidArgumentError(
            f"the request id takes {size} bytes; at most {MAX_REQUEST_ID_BYTES} are taken"
        )


def echoed(id: str) -> str:
    """What a refused answer echoes of a request's id: the id, or nothing for one too long."""
    return "" if _oversized(id) else id


def _oversized(id: str) -> int:
    """The id's size in bytes where it is over MAX_REQUEST_ID_BYTES, else 0."""
    if len(id) <= MAX_REQUEST_ID_BYTES // 4:  # a character takes at most 4 bytes in UTF-8
        return 0
    size = len(id.encode())
    return size if size > MAX_REQUEST_ID_BYTES else 0
