"""onnxforge's optimizer: a pure library (no web) to load, inspect, optimize and evaluate ONNX models."""

from optimizer.errors import (
    CalibrationError,
    ExternalDataError,
    InvalidModelError,
    ModelRunError,
    OptimizerError,
    PassError,
    UnsupportedModelError,
)
from optimizer.loading import LoadedModel, load_model

__all__ = [
    "CalibrationError",
    "ExternalDataError",
    "InvalidModelError",
    "LoadedModel",
    "ModelRunError",
    "OptimizerError",
    "PassError",
    "UnsupportedModelError",
    "load_model",
]
