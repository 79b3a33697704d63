"""The inference service's options for recording served requests (inference_service/recording.py):
where the samples go, how the service reaches those trainers, and how much may wait. Declared
here, one line each in InferenceSettings (settings.py), which they keep their place in."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from inference_service.recording import DEFAULT_QUEUE, DEFAULT_QUEUE_BYTES
from shared.cli import ADDRESSES, BOOLEAN, PATH, SIZE, TOKEN, integer
from shared.settings import option


def experience() -> Any:
    return field(
        default=None,
        metadata=option(
            "--experience",
            "INFERENCE_EXPERIENCE",
            "experience planes of the trainers that recorded requests go to (models declared "
            "with record=, requests with the parameter record); comma-separated, a DNS name "
            "stands for every address it resolves to, and each buffer's samples go to the "
            "trainer that holds it",
            ADDRESSES,
            default_text="none (recording off)",
        ),
    )


def experience_token() -> Any:
    return field(
        default=None,
        metadata=option(
            "--experience-token",
            "INFERENCE_EXPERIENCE_TOKEN",
            "bearer token presented on the trainers' experience plane",
            convert=TOKEN,
        ),
    )


def experience_tls() -> Any:
    return field(
        default=False,
        metadata=option(
            "--experience-tls",
            "INFERENCE_EXPERIENCE_TLS",
            "reach the trainers' experience planes over TLS, verifying them against the "
            "system's CAs (implied by --experience-tls-ca and --experience-tls-cert)",
            BOOLEAN,
            switch=True,
        ),
    )


def experience_tls_ca() -> Any:
    return field(
        default=None,
        metadata=option(
            "--experience-tls-ca",
            "INFERENCE_EXPERIENCE_TLS_CA",
            "PEM CA: reach the trainers' experience planes over TLS, verifying them against it",
            PATH,
        ),
    )


def experience_tls_cert() -> Any:
    return field(
        default=None,
        metadata=option(
            "--experience-tls-cert",
            "INFERENCE_EXPERIENCE_TLS_CERT",
            "PEM client certificate presented to the trainers' experience planes, where they "
            "require mutual TLS",
            PATH,
        ),
    )


def experience_tls_key() -> Any:
    return field(
        default=None,
        metadata=option(
            "--experience-tls-key",
            "INFERENCE_EXPERIENCE_TLS_KEY",
            "PEM private key of --experience-tls-cert",
            PATH,
        ),
    )


def experience_tls_server_name() -> Any:
    return field(
        default=None,
        metadata=option(
            "--experience-tls-server-name",
            "INFERENCE_EXPERIENCE_TLS_SERVER_NAME",
            "the host name the trainers' certificates carry, when --experience names them "
            "otherwise (IP addresses)",
            metavar="NAME",
        ),
    )


def record_queue() -> Any:
    return field(
        default=DEFAULT_QUEUE,
        metadata=option(
            "--record-queue",
            "INFERENCE_RECORD_QUEUE",
            "served requests waiting to be recorded; beyond, their samples are dropped and "
            "counted (the answers never wait)",
            integer(1),
        ),
    )


def record_queue_bytes() -> Any:
    return field(
        default=DEFAULT_QUEUE_BYTES,
        metadata=option(
            "--record-queue-bytes",
            "INFERENCE_RECORD_QUEUE_BYTES",
            "tensor bytes of the served requests waiting to be recorded; beyond, their samples "
            "are dropped and counted",
            SIZE,
        ),
    )


def record_asked() -> Any:
    return field(
        default=True,
        metadata=option(
            "--record-asked",
            "INFERENCE_RECORD_ASKED",
            "record a request into the buffer its parameter record names (false: only what the "
            "models declare is recorded, and a request asking is refused UNIMPLEMENTED: a "
            "data-plane client cannot add samples to a trainer's buffers)",
            BOOLEAN,
        ),
    )
