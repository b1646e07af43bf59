"""A session's inputs and outputs as numpy dtypes and shapes, read from ONNX Runtime itself.

The session (not the ONNX file) is the authority: it is what will refuse a wrong feed, and an
optimized variant may declare different types than the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimizer.loading import is_anonymous_dim_name

# ONNX Runtime's type strings -> numpy. Strings are fed as object arrays of str.
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output. `dtype` is None for types predict cannot feed (sequences, maps)."""

    name: str
    type: str  # ONNX Runtime's own type string, e.g. "tensor(float)"
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None  # ints fixed, str/None dynamic; None = unknown rank

    @property
    def dtype_name(self) -> str:
        if self.dtype is None:
            return self.type
        return "string" if self.dtype == np.dtype(object) else self.dtype.name

    def describe(self) -> dict:
        """JSON-ready: dynamic dims as their symbol (or null)."""
        shape = None if self.shape is None else [d if isinstance(d, int) else (d or None) for d in self.shape]
        return {"name": self.name, "dtype": self.dtype_name, "shape": shape}


def _spec(node_arg) -> TensorSpec:  # noqa: ANN001 - onnxruntime.NodeArg
    """WHY names like '?' become None: the original variant serves the uploaded file as it is, and Paddle2ONNX names
    every unknown dimension '?' (PP-OCR's classifier [-1, 3, '?', '?']): read as one shared size, every real
    48x192 crop was refused (only square ones ran). The optimizer reads such names as unknown too."""
    shape = node_arg.shape
    dims: tuple[int | str | None, ...] | None
    if shape is None:
        dims = None
    else:
        dims = tuple(d if isinstance(d, int) and d >= 0
                     else (d if isinstance(d, str) and not is_anonymous_dim_name(d) else None) for d in shape)
    return TensorSpec(node_arg.name, node_arg.type, ORT_DTYPES.get(node_arg.type), dims)


def signature_of(session) -> tuple[list[TensorSpec], list[TensorSpec]]:  # noqa: ANN001 - InferenceSession
    """The session's (inputs, outputs)."""
    return [_spec(i) for i in session.get_inputs()], [_spec(o) for o in session.get_outputs()]
