from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttentionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_KIND_UNSPECIFIED: _ClassVar[AttentionKind]
    CROSS: _ClassVar[AttentionKind]
    DECODER_SELF: _ClassVar[AttentionKind]
    ENCODER_SELF: _ClassVar[AttentionKind]
ATTENTION_KIND_UNSPECIFIED: AttentionKind
CROSS: AttentionKind
DECODER_SELF: AttentionKind
ENCODER_SELF: AttentionKind

class TranslateRequest(_message.Message):
    __slots__ = ("texts", "options")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: TranslateOptions
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[TranslateOptions, _Mapping]] = ...) -> None: ...

class TranslateOptions(_message.Message):
    __slots__ = ("beam_size", "max_length", "length_penalty", "replace_unknowns", "attention")
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPLACE_UNKNOWNS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    beam_size: int
    max_length: int
    length_penalty: float
    replace_unknowns: bool
    attention: AttentionRequest
    def __init__(self, beam_size: _Optional[int] = ..., max_length: _Optional[int] = ..., length_penalty: _Optional[float] = ..., replace_unknowns: _Optional[bool] = ..., attention: _Optional[_Union[AttentionRequest, _Mapping]] = ...) -> None: ...

class AttentionRequest(_message.Message):
    __slots__ = ("kinds", "layers", "heads")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[AttentionKind]
    layers: _containers.RepeatedScalarFieldContainer[int]
    heads: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kinds: _Optional[_Iterable[_Union[AttentionKind, str]]] = ..., layers: _Optional[_Iterable[int]] = ..., heads: _Optional[_Iterable[int]] = ...) -> None: ...

class TranslateStreamRequest(_message.Message):
    __slots__ = ("text", "options")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    text: str
    options: TranslateOptions
    def __init__(self, text: _Optional[str] = ..., options: _Optional[_Union[TranslateOptions, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("translations",)
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    translations: _containers.RepeatedCompositeFieldContainer[Translation]
    def __init__(self, translations: _Optional[_Iterable[_Union[Translation, _Mapping]]] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("text", "source_tokens", "target_tokens", "score", "log_prob", "unknown_words", "attention", "timings", "longer_than_training")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_WORDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LONGER_THAN_TRAINING_FIELD_NUMBER: _ClassVar[int]
    text: str
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    target_tokens: _containers.RepeatedScalarFieldContainer[str]
    score: float
    log_prob: float
    unknown_words: _containers.RepeatedScalarFieldContainer[str]
    attention: _containers.RepeatedCompositeFieldContainer[AttentionMap]
    timings: Timings
    longer_than_training: bool
    def __init__(self, text: _Optional[str] = ..., source_tokens: _Optional[_Iterable[str]] = ..., target_tokens: _Optional[_Iterable[str]] = ..., score: _Optional[float] = ..., log_prob: _Optional[float] = ..., unknown_words: _Optional[_Iterable[str]] = ..., attention: _Optional[_Iterable[_Union[AttentionMap, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., longer_than_training: _Optional[bool] = ...) -> None: ...

class AttentionMap(_message.Message):
    __slots__ = ("kind", "layers", "heads", "weights", "row_tokens", "column_tokens")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ROW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COLUMN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kind: AttentionKind
    layers: _containers.RepeatedScalarFieldContainer[int]
    heads: _containers.RepeatedScalarFieldContainer[int]
    weights: Tensor
    row_tokens: _containers.RepeatedScalarFieldContainer[str]
    column_tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[AttentionKind, str]] = ..., layers: _Optional[_Iterable[int]] = ..., heads: _Optional[_Iterable[int]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., row_tokens: _Optional[_Iterable[str]] = ..., column_tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[_Iterable[float]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class TranslateStreamResponse(_message.Message):
    __slots__ = ("token", "translation")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    token: TokenEvent
    translation: Translation
    def __init__(self, token: _Optional[_Union[TokenEvent, _Mapping]] = ..., translation: _Optional[_Union[Translation, _Mapping]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("index", "token_id", "token")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    token: str
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "architecture", "source_vocab_size", "target_vocab_size", "execution_provider", "batching", "limits", "training_metrics", "precision")
    class TrainingMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_METRICS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: Architecture
    source_vocab_size: int
    target_vocab_size: int
    execution_provider: str
    batching: BatchingSettings
    limits: Limits
    training_metrics: _containers.ScalarMap[str, float]
    precision: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[_Union[Architecture, _Mapping]] = ..., source_vocab_size: _Optional[int] = ..., target_vocab_size: _Optional[int] = ..., execution_provider: _Optional[str] = ..., batching: _Optional[_Union[BatchingSettings, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., training_metrics: _Optional[_Mapping[str, float]] = ..., precision: _Optional[str] = ...) -> None: ...

class Architecture(_message.Message):
    __slots__ = ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff")
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_DECODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    d_model: int
    n_heads: int
    n_encoder_layers: int
    n_decoder_layers: int
    d_ff: int
    def __init__(self, d_model: _Optional[int] = ..., n_heads: _Optional[int] = ..., n_encoder_layers: _Optional[int] = ..., n_decoder_layers: _Optional[int] = ..., d_ff: _Optional[int] = ...) -> None: ...

class BatchingSettings(_message.Message):
    __slots__ = ("max_batch_size", "max_batch_tokens", "max_queue_delay_ms", "max_queue_size")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_batch_tokens: int
    max_queue_delay_ms: float
    max_queue_size: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_texts_per_request", "max_tokens_per_text", "max_beam_size", "max_length")
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    max_texts_per_request: int
    max_tokens_per_text: int
    max_beam_size: int
    max_length: int
    def __init__(self, max_texts_per_request: _Optional[int] = ..., max_tokens_per_text: _Optional[int] = ..., max_beam_size: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...
