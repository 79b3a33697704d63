from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushHeader(_message.Message):
    __slots__ = ("model_name", "version", "base_version", "writer_id", "payload_bytes", "writer_epoch", "route", "resume_from")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    base_version: int
    writer_id: str
    payload_bytes: int
    writer_epoch: int
    route: _containers.RepeatedCompositeFieldContainer[Hop]
    resume_from: int
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., base_version: _Optional[int] = ..., writer_id: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., writer_epoch: _Optional[int] = ..., route: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., resume_from: _Optional[int] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("address", "server_name", "writer_epoch")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    WRITER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    address: str
    server_name: str
    writer_epoch: int
    def __init__(self, address: _Optional[str] = ..., server_name: _Optional[str] = ..., writer_epoch: _Optional[int] = ...) -> None: ...

class HopResult(_message.Message):
    __slots__ = ("address", "version", "code", "reason", "message")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    address: str
    version: int
    code: int
    reason: str
    message: str
    def __init__(self, address: _Optional[str] = ..., version: _Optional[int] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class AcquireWriterRequest(_message.Message):
    __slots__ = ("model_name", "writer_id")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    writer_id: str
    def __init__(self, model_name: _Optional[str] = ..., writer_id: _Optional[str] = ...) -> None: ...

class WriterLease(_message.Message):
    __slots__ = ("model_name", "writer_id", "epoch", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    writer_id: str
    epoch: int
    version: int
    def __init__(self, model_name: _Optional[str] = ..., writer_id: _Optional[str] = ..., epoch: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class PushCommit(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    def __init__(self, digest: _Optional[bytes] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "data", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    data: bytes
    commit: PushCommit
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., commit: _Optional[_Union[PushCommit, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("model_name", "version", "digest", "payload_bytes", "hops", "finish_seconds")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    FINISH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    digest: bytes
    payload_bytes: int
    hops: _containers.RepeatedCompositeFieldContainer[HopResult]
    finish_seconds: float
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., digest: _Optional[bytes] = ..., payload_bytes: _Optional[int] = ..., hops: _Optional[_Iterable[_Union[HopResult, _Mapping]]] = ..., finish_seconds: _Optional[float] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class TensorState(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PendingPush(_message.Message):
    __slots__ = ("writer_id", "version", "base_version", "bytes_received", "payload_bytes")
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    writer_id: str
    version: int
    base_version: int
    bytes_received: int
    payload_bytes: int
    def __init__(self, writer_id: _Optional[str] = ..., version: _Optional[int] = ..., base_version: _Optional[int] = ..., bytes_received: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class ModelState(_message.Message):
    __slots__ = ("model_name", "version", "digest", "writer_id", "accepts_pushes", "tensors", "pending", "lease_holder", "writer_epoch", "instance_id")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PUSHES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LEASE_HOLDER_FIELD_NUMBER: _ClassVar[int]
    WRITER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    digest: bytes
    writer_id: str
    accepts_pushes: bool
    tensors: _containers.RepeatedCompositeFieldContainer[TensorState]
    pending: PendingPush
    lease_holder: str
    writer_epoch: int
    instance_id: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., digest: _Optional[bytes] = ..., writer_id: _Optional[str] = ..., accepts_pushes: bool = ..., tensors: _Optional[_Iterable[_Union[TensorState, _Mapping]]] = ..., pending: _Optional[_Union[PendingPush, _Mapping]] = ..., lease_holder: _Optional[str] = ..., writer_epoch: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelState]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelState, _Mapping]]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "writer_id", "digest", "committed_at", "size_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    writer_id: str
    digest: bytes
    committed_at: float
    size_bytes: int
    def __init__(self, version: _Optional[int] = ..., writer_id: _Optional[str] = ..., digest: _Optional[bytes] = ..., committed_at: _Optional[float] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("model_name", "serving", "versions")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    serving: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, model_name: _Optional[str] = ..., serving: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model_name", "to_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    to_version: int
    def __init__(self, model_name: _Optional[str] = ..., to_version: _Optional[int] = ...) -> None: ...

class SeedRequest(_message.Message):
    __slots__ = ("model_name", "version", "hop")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    hop: Hop
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., hop: _Optional[_Union[Hop, _Mapping]] = ...) -> None: ...
