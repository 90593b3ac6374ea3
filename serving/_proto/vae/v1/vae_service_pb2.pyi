from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("x", "model", "version")
    X_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    model: str
    version: str
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("mu", "var")
    MU_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    mu: Tensor
    var: Tensor
    def __init__(self, mu: _Optional[_Union[Tensor, _Mapping]] = ..., var: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("count", "seed", "temperature", "return_z", "model", "version")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    RETURN_Z_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    count: int
    seed: int
    temperature: float
    return_z: bool
    model: str
    version: str
    def __init__(self, count: _Optional[int] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., return_z: _Optional[bool] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("x", "z", "seed")
    X_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    z: Tensor
    seed: int
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class ReconstructRequest(_message.Message):
    __slots__ = ("x", "use_mean", "seed", "model", "version")
    X_FIELD_NUMBER: _ClassVar[int]
    USE_MEAN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    use_mean: bool
    seed: int
    model: str
    version: str
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., use_mean: _Optional[bool] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ReconstructResponse(_message.Message):
    __slots__ = ("x_hat", "recon_log_lik", "kl", "seed")
    X_HAT_FIELD_NUMBER: _ClassVar[int]
    RECON_LOG_LIK_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    x_hat: Tensor
    recon_log_lik: Tensor
    kl: Tensor
    seed: int
    def __init__(self, x_hat: _Optional[_Union[Tensor, _Mapping]] = ..., recon_log_lik: _Optional[_Union[Tensor, _Mapping]] = ..., kl: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("z", "model", "version")
    Z_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    z: Tensor
    model: str
    version: str
    def __init__(self, z: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("x",)
    X_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("x", "k", "seed", "quantile", "want_feature_scores", "kind", "model", "version")
    X_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    WANT_FEATURE_SCORES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    k: int
    seed: int
    quantile: float
    want_feature_scores: bool
    kind: str
    model: str
    version: str
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., seed: _Optional[int] = ..., quantile: _Optional[float] = ..., want_feature_scores: _Optional[bool] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("score", "nll", "percentile", "is_outlier", "threshold", "feature_scores", "k", "seed", "kind", "quantile", "calibrated", "calibration")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NLL_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    IS_OUTLIER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCORES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    score: Tensor
    nll: Tensor
    percentile: Tensor
    is_outlier: _containers.RepeatedScalarFieldContainer[bool]
    threshold: float
    feature_scores: Tensor
    k: int
    seed: int
    kind: str
    quantile: float
    calibrated: bool
    calibration: str
    def __init__(self, score: _Optional[_Union[Tensor, _Mapping]] = ..., nll: _Optional[_Union[Tensor, _Mapping]] = ..., percentile: _Optional[_Union[Tensor, _Mapping]] = ..., is_outlier: _Optional[_Iterable[bool]] = ..., threshold: _Optional[float] = ..., feature_scores: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., seed: _Optional[int] = ..., kind: _Optional[str] = ..., quantile: _Optional[float] = ..., calibrated: _Optional[bool] = ..., calibration: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("name", "version", "example_shape", "latent_dim", "likelihood", "learned_variance", "normalization_kind", "normalization_offset", "normalization_scale", "providers", "max_batch_size", "max_queue_delay_us", "max_queue_rows", "max_sample_count", "manifest_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    LEARNED_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_KIND_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_SCALE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    example_shape: _containers.RepeatedScalarFieldContainer[int]
    latent_dim: int
    likelihood: str
    learned_variance: bool
    normalization_kind: str
    normalization_offset: _containers.RepeatedScalarFieldContainer[float]
    normalization_scale: _containers.RepeatedScalarFieldContainer[float]
    providers: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    max_queue_delay_us: int
    max_queue_rows: int
    max_sample_count: int
    manifest_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., example_shape: _Optional[_Iterable[int]] = ..., latent_dim: _Optional[int] = ..., likelihood: _Optional[str] = ..., learned_variance: _Optional[bool] = ..., normalization_kind: _Optional[str] = ..., normalization_offset: _Optional[_Iterable[float]] = ..., normalization_scale: _Optional[_Iterable[float]] = ..., providers: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., max_queue_rows: _Optional[int] = ..., max_sample_count: _Optional[int] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class EncodeStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: EncodeRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[EncodeRequest, _Mapping]] = ...) -> None: ...

class EncodeStreamResponse(_message.Message):
    __slots__ = ("id", "status", "response")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    response: EncodeResponse
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., response: _Optional[_Union[EncodeResponse, _Mapping]] = ...) -> None: ...

class DecodeStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: DecodeRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[DecodeRequest, _Mapping]] = ...) -> None: ...

class DecodeStreamResponse(_message.Message):
    __slots__ = ("id", "status", "response")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    response: DecodeResponse
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., response: _Optional[_Union[DecodeResponse, _Mapping]] = ...) -> None: ...

class ReconstructStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: ReconstructRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[ReconstructRequest, _Mapping]] = ...) -> None: ...

class ReconstructStreamResponse(_message.Message):
    __slots__ = ("id", "status", "response")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    response: ReconstructResponse
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., response: _Optional[_Union[ReconstructResponse, _Mapping]] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: ScoreRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[ScoreRequest, _Mapping]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("id", "status", "response")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    response: ScoreResponse
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ...) -> None: ...
