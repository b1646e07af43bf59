"""One error hierarchy for everything the optimizer refuses or fails at.

Every message says what is wrong and what the user can do about it: the service maps these
to 4xx answers and failed jobs verbatim, so a bare library traceback must never reach a user.
"""


class OptimizerError(Exception):
    """Base class: a problem with the user's model, data or request, explained in words."""


class InvalidModelError(OptimizerError):
    """The bytes are not a valid ONNX model (not a protobuf, or the ONNX checker refuses it)."""


class UnsupportedModelError(OptimizerError):
    """A valid ONNX model that the installed ONNX Runtime cannot load or run."""


class ExternalDataError(OptimizerError):
    """A tensor points at external data that is missing or lies outside the model's folder."""


class CalibrationError(OptimizerError):
    """The calibration sample set does not match the model's inputs or cannot be read."""


class PassError(OptimizerError):
    """An optimization pass failed: the tool raised, or wrote a model that does not load or run."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what a report or an error answer can show."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
