from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE: _ClassVar[Compression]
    FLOAT16: _ClassVar[Compression]
    UNIFORM_8BIT: _ClassVar[Compression]
NONE: Compression
FLOAT16: Compression
UNIFORM_8BIT: Compression

class Tensor(_message.Message):
    __slots__ = ("buffer", "shape", "dtype", "compression")
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    buffer: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    compression: Compression
    def __init__(self, buffer: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class TensorSchema(_message.Message):
    __slots__ = ("shape", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("uid", "inputs", "reply_compression")
    UID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REPLY_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    uid: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    reply_compression: Compression
    def __init__(self, uid: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., reply_compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("uid", "inputs", "grad_outputs", "reply_compression")
    UID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REPLY_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    uid: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    grad_outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    reply_compression: Compression
    def __init__(self, uid: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., grad_outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., reply_compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_inputs",)
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    grad_inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, grad_inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class ForwardBatchRequest(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[ForwardRequest]
    def __init__(self, parts: _Optional[_Iterable[_Union[ForwardRequest, _Mapping]]] = ...) -> None: ...

class BackwardBatchRequest(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[BackwardRequest]
    def __init__(self, parts: _Optional[_Iterable[_Union[BackwardRequest, _Mapping]]] = ...) -> None: ...

class PartReply(_message.Message):
    __slots__ = ("tensors", "code", "message")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    code: int
    message: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardBatchResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[PartReply]
    def __init__(self, parts: _Optional[_Iterable[_Union[PartReply, _Mapping]]] = ...) -> None: ...

class BackwardBatchResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[PartReply]
    def __init__(self, parts: _Optional[_Iterable[_Union[PartReply, _Mapping]]] = ...) -> None: ...

class PackedRequest(_message.Message):
    __slots__ = ("uids", "rows", "inputs", "grad_outputs", "reply_compression")
    UIDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REPLY_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    uids: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedScalarFieldContainer[int]
    inputs: Tensor
    grad_outputs: Tensor
    reply_compression: Compression
    def __init__(self, uids: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[int]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., grad_outputs: _Optional[_Union[Tensor, _Mapping]] = ..., reply_compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class PackedReply(_message.Message):
    __slots__ = ("codes", "messages", "outputs")
    CODES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    codes: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedScalarFieldContainer[str]
    outputs: Tensor
    def __init__(self, codes: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[str]] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ExpertStats(_message.Message):
    __slots__ = ("forward_calls", "backward_calls", "forward_tokens", "backward_tokens", "errors", "rejected", "queued_tokens", "latency_p50_ms", "latency_p99_ms", "optimizer_steps", "skipped_updates")
    FORWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    forward_calls: int
    backward_calls: int
    forward_tokens: int
    backward_tokens: int
    errors: int
    rejected: int
    queued_tokens: int
    latency_p50_ms: float
    latency_p99_ms: float
    optimizer_steps: int
    skipped_updates: int
    def __init__(self, forward_calls: _Optional[int] = ..., backward_calls: _Optional[int] = ..., forward_tokens: _Optional[int] = ..., backward_tokens: _Optional[int] = ..., errors: _Optional[int] = ..., rejected: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., optimizer_steps: _Optional[int] = ..., skipped_updates: _Optional[int] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("uid", "expert_cls", "inputs", "outputs", "version", "num_parameters", "stats")
    UID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CLS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    expert_cls: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSchema]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSchema]
    version: int
    num_parameters: int
    stats: ExpertStats
    def __init__(self, uid: _Optional[str] = ..., expert_cls: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSchema, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSchema, _Mapping]]] = ..., version: _Optional[int] = ..., num_parameters: _Optional[int] = ..., stats: _Optional[_Union[ExpertStats, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("uids",)
    UIDS_FIELD_NUMBER: _ClassVar[int]
    uids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, uids: _Optional[_Iterable[str]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "dmoe_version", "device", "experts", "max_batch_tokens", "max_message_bytes", "max_request_bytes", "receiving_bytes", "expert_calls", "batched_calls", "batched_parts", "packed_calls")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DMOE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVING_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CALLS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_CALLS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_PARTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_CALLS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    dmoe_version: str
    device: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    max_batch_tokens: int
    max_message_bytes: int
    max_request_bytes: int
    receiving_bytes: int
    expert_calls: int
    batched_calls: int
    batched_parts: int
    packed_calls: int
    def __init__(self, node_id: _Optional[str] = ..., dmoe_version: _Optional[str] = ..., device: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ..., max_batch_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., receiving_bytes: _Optional[int] = ..., expert_calls: _Optional[int] = ..., batched_calls: _Optional[int] = ..., batched_parts: _Optional[int] = ..., packed_calls: _Optional[int] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("uid", "skip_optimizer")
    UID_FIELD_NUMBER: _ClassVar[int]
    SKIP_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    uid: str
    skip_optimizer: bool
    def __init__(self, uid: _Optional[str] = ..., skip_optimizer: _Optional[bool] = ...) -> None: ...

class StateTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("uid", "expert_cls", "optimizer", "version", "tensors", "total_bytes", "sha256")
    UID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CLS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    uid: str
    expert_cls: str
    optimizer: str
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[StateTensor]
    total_bytes: int
    sha256: bytes
    def __init__(self, uid: _Optional[str] = ..., expert_cls: _Optional[str] = ..., optimizer: _Optional[str] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[StateTensor, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
