"""onnxforge's optimizer: a pure library (no web) to load, inspect, optimize and evaluate ONNX models."""

from importlib.metadata import PackageNotFoundError, version

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

try:  # the installed distribution's version: pyproject.toml's, one number for the library and the CLI
    __version__ = version("onnxforge")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CalibrationError",
    "ExternalDataError",
    "InvalidModelError",
    "LoadedModel",
    "ModelRunError",
    "OptimizerError",
    "PassError",
    "UnsupportedModelError",
    "__version__",
    "load_model",
]
