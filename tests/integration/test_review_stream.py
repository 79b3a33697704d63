"""An outside review of the data plane's streaming, recording and lookups, from a client written
apart from the project's code: what a ModelStreamInfer stream answers for a request that fails
(its id, a bounded message, the final flag Triton's clients wait for), what it holds for answers
its client does not read, an answer too large for a message, which requested outputs are refused
before the model runs, and what recording keeps of requests that fail or do not fit a buffer."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from inference_service.dataplane.servicer import MAX_REQUEST_ID_BYTES
from shared import protocol
from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.grpc.errors import error_reason
from shared.grpc.options import DATA_MAX_MESSAGE_BYTES
from tests.integration.conftest import Services, wait_until
from tests.integration.test_dataplane_holes import HOLES, in_flight, output, request, rows, stub
from tests.integration.test_experience_recording import APP as RECORDED
from tests.integration.test_experience_recording import free_port, infer, refused
from tests.integration.test_experience_recording import request as recorded_request

MiB = 1 << 20
WIDTHS = "tests.integration.stream_apps:widths"


class Requests:
    """A request iterator for a stream that stays open until `close` (a client that keeps its
    stream open, idle, after its answers came)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[oip.ModelInferRequest | None] = queue.Queue()

    def send(self, message: oip.ModelInferRequest) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[oip.ModelInferRequest]:
        while (message := self._queue.get()) is not None:
            yield message


def with_id(message: oip.ModelInferRequest, id: str) -> oip.ModelInferRequest:
    message.id = id
    return message


PAD = "pad"


def padded(message: oip.ModelInferRequest, size: int) -> oip.ModelInferRequest:
    """`message` with a parameter of `size` bytes, which its answer echoes."""
    message.parameters[PAD].string_param = "p" * size
    return message


# Triton's convention (its server puts the id back "so that client knows which request
# failed"): an in-band error carries the failed request's id. It came back with no id, and with
# the whole message however long (a megabyte, echoing a megabyte model name), where every status
# message of the service is cut to 2,048 bytes.
def test_a_failed_request_on_a_stream_answers_with_its_id_and_a_bounded_message(
    services: Services,
) -> None:
    inference = services.inference(HOLES)
    first, last = rows(1, 4), rows(2, 4)
    sent = [
        with_id(request("ragged", x=first), "a"),
        with_id(request("n" * MiB, x=first), "b"),
        with_id(request("ragged", version="7", x=first), "c"),
        with_id(oip.ModelInferRequest(model_name="ragged"), "d"),
        with_id(request("ragged", x=last), "e"),
    ]
    answers = list(stub(inference).ModelStreamInfer(iter(sent), timeout=30))
    assert [a.infer_response.id for a in answers] == ["a", "b", "c", "d", "e"]
    assert [bool(a.error_message) for a in answers] == [False, True, True, True, False]
    assert output(answers[0].infer_response).tobytes() == first.tobytes()
    assert output(answers[4].infer_response).tobytes() == last.tobytes()
    unknown = answers[1].error_message
    assert unknown.startswith("no model named 'nnnn") and unknown.endswith("bytes cut)")
    assert len(unknown.encode()) <= 2048
    assert answers[2].error_message.startswith("model 'ragged' version 7 is not served")
    assert answers[3].error_message == "missing input(s) x"
    assert not answers[1].infer_response.outputs and not answers[1].infer_response.model_name
    assert "unhandled" not in inference.log.read_text()


# An id is echoed in every answer, a refused one's too, and answers that wait on a stream hold
# it: 64 refused answers echoing 64 MiB ids held 4 GiB a stream that no admission bound counted.
def test_an_id_over_4096_bytes_is_refused_and_not_echoed(services: Services) -> None:
    inference = services.inference(HOLES)
    x = rows(1, 4)
    most, over = "é" * (MAX_REQUEST_ID_BYTES // 2), "i" * (MAX_REQUEST_ID_BYTES + 1)
    data = stub(inference)
    assert data.ModelInfer(with_id(request("ragged", x=x), most), timeout=10).id == most
    with pytest.raises(grpc.RpcError) as caught:
        data.ModelInfer(with_id(request("ragged", x=x), over), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "the request id takes 4097 bytes; at most 4096 are taken"
    sent = [with_id(request("ragged", x=x), i) for i in ("a", "é" + most, over, "b")]
    answers = list(data.ModelStreamInfer(iter(sent), timeout=30))
    assert [a.infer_response.id for a in answers] == ["a", "", "", "b"]
    assert answers[1].error_message == "the request id takes 4098 bytes; at most 4096 are taken"
    assert [bool(a.error_message) for a in answers] == [False, True, True, False]
    assert output(answers[3].infer_response).tobytes() == x.tobytes()


# The stream ran up to 64 requests at once and held their answers until its client read them,
# but a request gave its place back to `--max-requests-in-flight` and the request bytes in
# flight as soon as its model had run: a client that never read held 64 answers per stream
# (4 GiB of 64 MiB answers) that no limit of the service counted, on as many streams as it
# opened. A request on a stream now keeps its place until its answer is handed to gRPC.
def test_answers_a_stream_does_not_read_keep_their_places_until_read_or_cancelled(
    services: Services,
) -> None:
    inference = services.inference(HOLES, "--max-requests-in-flight", "2")
    data = stub(inference)
    sent = [rows(1, MiB // 4) for _ in range(70)]  # 1 MiB each: more than a flow-control window
    requests = Requests()
    for i, x in enumerate(sent):
        requests.send(with_id(request("ragged", x=x), str(i)))
    answers = data.ModelStreamInfer(iter(requests), timeout=60)
    # Nothing read: once the client's flow-control window is full, two answers wait on it and
    # hold the model's two places. (Until then answers still drain into the window, each
    # letting a place go for a moment, which a request may take: it is answered.)
    deadline = time.monotonic() + 60
    caught: grpc.RpcError | None = None
    while caught is None and time.monotonic() < deadline:
        wait_until(lambda: in_flight(inference, "ragged") == 2, timeout=30)
        try:
            data.ModelInfer(request("ragged", x=rows(1, 4)), timeout=10)
        except grpc.RpcError as error:
            caught = error
    assert caught is not None, "a request was answered every time: no place stayed held"
    assert caught.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model 'ragged': 2 requests are in flight" in caught.details()

    got = [next(answers) for _ in sent]  # read at last: each answered, in order
    assert [a.infer_response.id for a in got] == [str(i) for i in range(len(sent))]
    ok = [i for i, a in enumerate(got) if not a.error_message]
    assert ok[:2] == [0, 1]
    for i in ok:
        assert output(got[i].infer_response).tobytes() == sent[i].tobytes()
    for a in got:
        assert not a.error_message or "2 requests are in flight" in a.error_message
    # The stream stays open, idle: it holds nothing.
    wait_until(lambda: in_flight(inference, "ragged") == 0, timeout=30)
    x = rows(1, 4)
    assert output(data.ModelInfer(request("ragged", x=x), timeout=10)).tobytes() == x.tobytes()
    requests.close()
    assert list(answers) == []

    # A stream cancelled with its answers unread gives their places back. (On a connection of
    # its own: the first one's flow-control window grew while it read 70 MiB.)
    more = Requests()
    for x in sent:
        more.send(request("ragged", x=x))
    fresh = grpc.insecure_channel(inference.data, options=[("grpc.use_local_subchannel_pool", 1)])
    cancelled = oip_grpc.GRPCInferenceServiceStub(fresh).ModelStreamInfer(iter(more), timeout=60)
    wait_until(lambda: in_flight(inference, "ragged") == 2, timeout=30)
    cancelled.cancel()
    more.close()
    wait_until(lambda: in_flight(inference, "ragged") == 0, timeout=30)
    fresh.close()
    assert output(data.ModelInfer(request("ragged", x=x), timeout=10)).tobytes() == x.tobytes()
    assert "unhandled" not in inference.log.read_text()


# A stream's unread answers kept their requests' places, but counted only the requests' tensors:
# an answer echoing megabytes of parameters (or a megabyte id, before ids were bounded, or
# outputs larger than the inputs) held its megabytes against 16 bytes counted, 64 of them a
# stream. An answer waiting on a stream now counts its own size.
def test_an_unread_answer_on_a_stream_counts_its_bytes_echoed_parameters_included(
    services: Services,
) -> None:
    inference = services.inference(HOLES, "--max-request-bytes-in-flight", str(MiB))
    data = stub(inference)
    sent = [rows(1, 4) for _ in range(10)]  # 16 bytes of tensors each
    requests = Requests()
    for i, x in enumerate(sent):
        requests.send(with_id(padded(request("ragged", x=x), 2 * MiB), f"{i:02d}"))
    answers = data.ModelStreamInfer(iter(requests), timeout=60)
    wait_until(
        lambda: inference.metric("weightsync_inference_request_bytes_in_flight") > 2 * MiB,
        timeout=30,
    )  # unread answers
    with pytest.raises(grpc.RpcError) as caught:
        data.ModelInfer(request("ragged", x=rows(1, 4)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests in flight hold" in caught.value.details()

    got = [next(answers) for _ in sent]
    assert [a.infer_response.id for a in got] == [f"{i:02d}" for i in range(len(sent))]
    assert not got[0].error_message
    for x, a in zip(sent, got, strict=True):
        if a.error_message:
            assert "requests in flight hold" in a.error_message
        else:
            assert len(a.infer_response.parameters[PAD].string_param) == 2 * MiB
            assert output(a.infer_response).tobytes() == x.tobytes()
    wait_until(
        lambda: inference.metric("weightsync_inference_request_bytes_in_flight") == 0, timeout=30
    )  # read: all given back
    x = rows(1, 4)
    assert output(data.ModelInfer(request("ragged", x=x), timeout=10)).tobytes() == x.tobytes()
    requests.close()
    assert list(answers) == []


def just_under_a_message() -> oip.ModelInferRequest:
    """A request to `ragged` of 3 bytes less than the data plane's message limit: its answer,
    which names the version and the output `x_out` where the request named `x`, is 4 bytes over
    the limit."""
    x = np.zeros((1, (DATA_MAX_MESSAGE_BYTES - 1024) // 4), np.float32)
    message = request("ragged", x=x)
    size = DATA_MAX_MESSAGE_BYTES - 3 - message.ByteSize()
    while (short := DATA_MAX_MESSAGE_BYTES - 3 - padded(message, size).ByteSize()) != 0:
        size += short  # less the parameter's framing
    return message


# An answer larger than a message of the data plane (a model returning more than it took, or an
# echoed id and parameters) failed only as gRPC sent it: ModelInfer got grpcio's own
# "Sent message larger than max" (and the service logged a traceback), and on a stream it ended
# the stream, every request behind it unanswered, where a failed request answers in-band.
def test_an_answer_larger_than_a_message_is_refused_alone_and_the_stream_goes_on(
    services: Services,
) -> None:
    inference = services.inference(HOLES)
    channel = grpc.insecure_channel(
        inference.data, options=[("grpc.max_send_message_length", DATA_MAX_MESSAGE_BYTES)]
    )
    data = oip_grpc.GRPCInferenceServiceStub(channel)
    big = just_under_a_message()
    with pytest.raises(grpc.RpcError) as caught:
        data.ModelInfer(big, timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == (
        f"the answer takes {DATA_MAX_MESSAGE_BYTES + 4} bytes, more than a message of the data "
        f"plane carries ({DATA_MAX_MESSAGE_BYTES}); send fewer rows per request, or ask for "
        "fewer outputs"
    )
    first, last = rows(1, 4), rows(3, 4)
    sent = [with_id(request("ragged", x=first), "a"), big, with_id(request("ragged", x=last), "c")]
    answers = list(data.ModelStreamInfer(iter(sent), timeout=60))
    assert [a.infer_response.id for a in answers] == ["a", "", "c"]
    assert output(answers[0].infer_response).tobytes() == first.tobytes()
    assert answers[1].error_message.startswith(
        f"the answer takes {DATA_MAX_MESSAGE_BYTES + 4} bytes, more than a message"
    )
    assert output(answers[2].infer_response).tobytes() == last.tobytes()
    channel.close()
    assert "Traceback" not in inference.log.read_text()


# An output named several times was encoded as many times: a request of 280 KB naming a
# 256 KiB output 2,000 times made the service build a 524 MB answer (which gRPC then refused to
# send); with 64 MiB outputs, tens of GB. Inputs given twice were already refused.
def test_an_output_requested_twice_is_refused_before_the_model_runs(services: Services) -> None:
    inference = services.inference(HOLES)
    data = stub(inference)
    message = request("ragged", x=rows(1, 4))
    for _ in range(2_000):
        message.outputs.add(name="x_out")
    with pytest.raises(grpc.RpcError) as caught:
        data.ModelInfer(message, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "output 'x_out' is requested twice"
    (stats,) = data.ModelStatistics(oip.ModelStatisticsRequest(name="ragged")).model_stats
    assert stats.inference_count == 0  # the refused request never ran
    x = rows(1, 4)
    once = request("ragged", x=x)
    once.outputs.add(name="x_out")
    assert output(data.ModelInfer(once, timeout=10)).tobytes() == x.tobytes()


# Triton's classification extension (an output's `classification` parameter: its top classes
# as BYTES "value:index" strings) is not offered here, and the server metadata does not list
# it; a request asking for it was answered with the plain FP32 output, which the client then
# reads as something it is not.
def test_an_output_asked_as_classes_is_refused_as_unimplemented(services: Services) -> None:
    inference = services.inference(HOLES)
    message = request("ragged", x=rows(1, 4))
    message.outputs.add(name="x_out").parameters["classification"].int64_param = 2
    with pytest.raises(grpc.RpcError) as caught:
        stub(inference).ModelInfer(message, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_reason(caught.value) == protocol.UNSUPPORTED
    assert "output 'x_out': the classification extension is not supported" in (
        caught.value.details()
    )
    x = rows(1, 4)
    plain = request("ragged", x=x)  # a count of 0 asks for no classes (Triton's reading)
    plain.outputs.add(name="x_out").parameters["classification"].int64_param = 0
    assert output(stub(inference).ModelInfer(plain, timeout=10)).tobytes() == x.tobytes()


# Recording took a request's tensors as soon as its model had run, before its requested outputs
# were checked: a request refused for an unknown output (INVALID_ARGUMENT) was recorded all the
# same, as if it had been served.
def test_a_request_refused_for_its_outputs_is_not_recorded(services: Services) -> None:
    inference = services.inference(RECORDED, "--experience", f"127.0.0.1:{free_port()}")
    unknown = recorded_request(torch.tensor([[1.0], [2.0], [3.0]]))
    unknown.outputs.add(name="nope")
    error = refused(inference, unknown)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "unknown output 'nope'; the model returns y"
    served = torch.tensor([[6.0]])
    assert infer(inference, recorded_request(served)).shape == (1, 1)  # the trainer is away
    recorded = 'weightsync_inference_recorded_samples_total{buffer="%s"}'
    wait_until(lambda: inference.metric(recorded % "served") >= 1)  # recorded in order
    assert inference.metric(recorded % "served") == 1
    twice = recorded_request(torch.tensor([[4.0], [5.0]]), record="asked")
    twice.outputs.add(name="y")
    twice.outputs.add(name="y")
    assert refused(inference, twice).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert infer(inference, recorded_request(served)).shape == (1, 1)
    wait_until(lambda: inference.metric(recorded % "served") >= 2)
    assert inference.metric(recorded % "served") == 2
    assert inference.metric(recorded % "asked") == 0


# The recorder handed every request's rows to the buffer's collector, whose first sample fixes
# the layout it takes for as long as it runs. A model that takes rows of any width, recording
# into a buffer of two-wide samples: one request of three-wide rows was taken (and refused by
# the trainer), and every well-formed request after it was dropped by the collector, recording
# broken until a restart. A request that does not fit the buffer is now dropped alone.
def test_a_request_whose_rows_do_not_fit_the_buffer_is_dropped_alone(
    services: Services,
) -> None:
    inference = services.inference(WIDTHS, "--experience", f"127.0.0.1:{free_port()}")
    data = stub(inference)
    wide, fits = rows(1, 3), rows(2, 2)
    assert output(data.ModelInfer(request("wide", x=wide), timeout=10)).tobytes() == wide.tobytes()
    assert output(data.ModelInfer(request("wide", x=fits), timeout=10)).tobytes() == fits.tobytes()
    recorded = 'weightsync_inference_recorded_samples_total{buffer="pairs"}'
    dropped = 'weightsync_inference_recorded_dropped_total{buffer="pairs",cause="%s"}'

    def counted() -> float:
        return sum(
            inference.metric(name) for name in (recorded, dropped % "shape", dropped % "trainer")
        )

    wait_until(lambda: counted() == 3)
    assert inference.metric(recorded) == 2
    assert inference.metric(dropped % "shape") == 1
    assert "are not recorded into pairs when their sizes differ" in inference.log.read_text()


# tritonclient's `enable_empty_final_response` asks the server to mark each request's last
# answer with the parameter `triton_final_response`, and clients that ask read until they see
# it. The stream echoed the request's parameters but never set the flag, so such a client
# waited forever for an answer that had come.
def test_an_answer_on_a_stream_is_marked_final_when_the_client_asks(services: Services) -> None:
    inference = services.inference(HOLES)
    x = rows(1, 4)
    asks = with_id(request("ragged", x=x), "asks")
    asks.parameters["triton_enable_empty_final_response"].bool_param = True
    plain = with_id(request("ragged", x=x), "plain")
    unknown = with_id(request("nope", x=x), "fails")
    unknown.parameters["triton_enable_empty_final_response"].bool_param = True
    first, second, third = stub(inference).ModelStreamInfer(
        iter([asks, plain, unknown]), timeout=30
    )
    assert output(first.infer_response).tobytes() == x.tobytes()
    assert first.infer_response.parameters["triton_final_response"].bool_param is True
    assert "triton_final_response" not in second.infer_response.parameters
    assert third.error_message.startswith("no model named 'nope'")
    assert third.infer_response.id == "fails"
