"""One error hierarchy for everything the optimizer refuses or fails at.

Every message says what is wrong and what the user can do about it: the service maps these
to 4xx answers and failed jobs verbatim, so a bare library traceback must never reach a user.
"""

import re


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


def from_onnxruntime(exc: BaseException) -> bool:
    """ONNX Runtime's own exceptions (InvalidArgument, Fail, ...) derive from Exception alone: known by their module."""
    return type(exc).__module__.startswith("onnxruntime")


# What ONNX Runtime wraps around the reason it gives: its status prefix, the file it was given (a server's temporary
# upload path, meaningless to the user) and the C++ source line and signature.
_ORT_NOISE = (
    re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"Load model from .*? failed:\s*"),
    re.compile(r"/onnxruntime_src/\S+:\d+ [^()]*\([^()]*\)(?: const)? "),
)


def ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's reason without the server paths and C++ frames (which say nothing to the user)."""
    text = first_line(exc)
    for pattern in _ORT_NOISE:
        text = pattern.sub("", text)
    return text.strip().rstrip(".")


#: How a library caller gives real inputs; the service and the command line say it their way (`explain`).
LIBRARY_HOW_TO_CALIBRATE = ("pass real inputs as calibration= (an .npz path or a dict {input name: array}, "
                            "one array per model input)")


class ModelRunError(UnsupportedModelError):
    """ONNX Runtime failed to run a model it loads, on the inputs the optimizer fed it.

    WHY one class: the library, the worker's jobs and the command line must say the same true thing. Which thing
    depends on the inputs: generated ones for a model with dynamic dimensions may simply not suit it (real inputs
    fix that); generated ones for a model whose every input shape is fixed have its own declared shapes, so advice
    to send other inputs would be wrong (the model itself is broken); calibration samples are the user's own.
    """

    def __init__(self, exc: BaseException, *, generated: bool, fixed_shapes: dict[str, list[int]] | None = None,
                 retried_dim: int | None = None) -> None:
        self.said = f"{type(exc).__name__}: {ort_reason(exc)}"
        self.generated = generated
        self.fixed_shapes = fixed_shapes  # every input's declared shape, when none has a dynamic dimension
        self.retried_dim = retried_dim  # the longest dynamic dimension tried (the pipeline's second tries)
        super().__init__(self.explained(LIBRARY_HOW_TO_CALIBRATE))

    def explained(self, how_to_calibrate: str) -> str:
        """The message, with `how_to_calibrate` saying how this caller's user gives real inputs."""
        if not self.generated:
            return f"ONNX Runtime fails to run the model on the calibration samples given: {self.said}"
        if self.fixed_shapes is not None:
            shapes = ", ".join(f"{name} {shape}" for name, shape in self.fixed_shapes.items()) or "no inputs"
            return (f"the model fails on inputs of its own declared shapes ({shapes}): {self.said}. None of its "
                    "inputs has a dynamic dimension, so no other inputs can fix this: the model itself is broken; "
                    "export it again")
        tried = f"dynamic dimensions set to 8, then to {self.retried_dim}" if self.retried_dim else \
            "dynamic dimensions set to 8"
        return (f"ONNX Runtime could not run the model on the inputs the optimizer generated, as no calibration "
                f"samples were given ({self.said}). Generated inputs (random values, {tried}) did not suit this "
                f"model: {how_to_calibrate}")


def explain(exc: BaseException, *, generated_inputs: bool, how_to_calibrate: str) -> str | None:
    """What a user reads when an optimization raised `exc`; None when it is unexpected (our bug: keep the traceback).

    The one mapping for the library's errors, the worker's jobs and the `onnxforge` command; `how_to_calibrate` says
    how the caller's user sends real inputs. An ONNX Runtime exception that no library call wrapped is read as a run
    on the inputs given (`generated_inputs`: none were, they were generated).
    """
    if isinstance(exc, ModelRunError):
        return exc.explained(how_to_calibrate)
    if isinstance(exc, OptimizerError):
        return str(exc)
    if not from_onnxruntime(exc):
        return None
    return ModelRunError(exc, generated=generated_inputs).explained(how_to_calibrate)
