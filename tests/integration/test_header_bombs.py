"""Safetensors headers built to break a JSON parser (an integer longer than Python converts,
arrays or objects nested deeper than it recurses) are refused as INVALID_ARGUMENT naming the
header, with no traceback in the service's log and the served weights untouched. They fit the
default --max-header-bytes, so they reach the parser."""

from __future__ import annotations

import grpc
import pytest

from tests.integration.conftest import Services
from tests.integration.stamp_writer import pushed_once

MB = 1
TOKEN = "sync-secret"

HEADERS = {
    "a 5,000-digit integer": (
        b'{"parts.0": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
        "safetensors header holds an integer of more than",
    ),
    "arrays 100,000 deep": (
        b"[" * 100_000,
        "safetensors header nests arrays or objects too deeply",
    ),
    "objects 100,000 deep": (
        b'{"a":' * 100_000,
        "safetensors header nests arrays or objects too deeply",
    ),
}


@pytest.mark.parametrize("relay", ["on", "off"])
def test_headers_that_break_a_json_parser_are_refused_as_invalid(
    services: Services, relay: str
) -> None:
    inference, writer, served = pushed_once(services, relay, TOKEN, MB)
    for name, (body, fragment) in HEADERS.items():
        blob = len(body).to_bytes(8, "little") + body + bytes(64)
        with pytest.raises(grpc.RpcError) as caught:
            writer.push_payload([blob], len(blob), 2, b"x" * 16)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, name
        assert fragment in (caught.value.details() or ""), name
        now = inference.model_state("stamp", token=TOKEN)
        assert (now.version, now.digest) == (served.version, served.digest), name
        assert not now.HasField("pending"), name
    log = inference.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    digest = writer.push(4.0, 2)  # and the model still takes a good push
    now = inference.model_state("stamp", token=TOKEN)
    assert (now.version, now.digest) == (2, digest)
