"""Typed, frozen run configuration. One tree per run; YAML maps onto it through `build_config`.

Every class validates itself in `__post_init__` and raises `ConfigError` naming the field and the
allowed values. Unknown keys are errors. `base` holds the error and its checks, `quantization`
the quantization section (`budget` its CVXQ budget), `run` the rest of the tree and `RunConfig` itself.
"""
from pipeline.config.base import (
    ConfigError,
    check_module_pattern,
)
from pipeline.config.budget import BudgetConfig, Distortion, Objective
from pipeline.config.quantization import (
    OVERRIDE_KEYS,
    SYMMETRIC_RANGES,
    Autocast,
    ClipParam,
    CrossLayerConfig,
    GPTQConfig,
    LorcConfig,
    LorcDtype,
    Method,
    Observer,
    OmniQuantConfig,
    Optimizer,
    QuantizationConfig,
    Rounding,
    SDEConfig,
)
from pipeline.config.run import (
    VLLM_ASYMMETRIC_BITS,
    CalibrationConfig,
    CheckpointConfig,
    ClusterConfig,
    Device,
    EvalConfig,
    ExportConfig,
    ExportFormat,
    ExportTarget,
    ModelConfig,
    RunConfig,
    Schedule,
    check_ray_address,
)

__all__ = [
    "OVERRIDE_KEYS",
    "SYMMETRIC_RANGES",
    "VLLM_ASYMMETRIC_BITS",
    "Autocast",
    "BudgetConfig",
    "CalibrationConfig",
    "CheckpointConfig",
    "ClipParam",
    "ClusterConfig",
    "ConfigError",
    "CrossLayerConfig",
    "Device",
    "Distortion",
    "EvalConfig",
    "ExportConfig",
    "ExportFormat",
    "ExportTarget",
    "GPTQConfig",
    "LorcConfig",
    "LorcDtype",
    "Method",
    "ModelConfig",
    "Objective",
    "Observer",
    "OmniQuantConfig",
    "Optimizer",
    "QuantizationConfig",
    "Rounding",
    "RunConfig",
    "SDEConfig",
    "Schedule",
    "check_module_pattern",
    "check_ray_address",
]
