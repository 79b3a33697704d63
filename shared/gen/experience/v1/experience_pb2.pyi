from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Batch(_message.Message):
    __slots__ = ("buffer", "sequence", "payload", "collector_id")
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    COLLECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    buffer: str
    sequence: int
    payload: bytes
    collector_id: str
    def __init__(self, buffer: _Optional[str] = ..., sequence: _Optional[int] = ..., payload: _Optional[bytes] = ..., collector_id: _Optional[str] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("sequence", "buffer", "samples", "payload_bytes", "duplicate")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    buffer: str
    samples: int
    payload_bytes: int
    duplicate: bool
    def __init__(self, sequence: _Optional[int] = ..., buffer: _Optional[str] = ..., samples: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., duplicate: bool = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BufferState(_message.Message):
    __slots__ = ("name", "tensors", "size", "received", "max_queue_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    size: int
    received: int
    max_queue_size: int
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., size: _Optional[int] = ..., received: _Optional[int] = ..., max_queue_size: _Optional[int] = ...) -> None: ...

class ListBuffersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBuffersResponse(_message.Message):
    __slots__ = ("buffers", "max_batch_bytes", "max_batch_samples")
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    buffers: _containers.RepeatedCompositeFieldContainer[BufferState]
    max_batch_bytes: int
    max_batch_samples: int
    def __init__(self, buffers: _Optional[_Iterable[_Union[BufferState, _Mapping]]] = ..., max_batch_bytes: _Optional[int] = ..., max_batch_samples: _Optional[int] = ...) -> None: ...
