"""The values an integer model input may take when it indexes a table (token ids into an embedding).

WHY: a calibration set whose ids pass the table's row count was accepted, and its job failed later with ONNX Runtime's
"indices element out of data bounds". The graph says the bound: an integer input that reaches the indices of a Gather
(through ops that keep its values) whose data is an initializer of V rows takes values 0 to V-1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from optimizer.errors import CalibrationError

#: Ops whose output holds exactly their first input's values (only the shape or the integer type changes).
_VALUE_KEEPING = frozenset({"Cast", "Unsqueeze", "Reshape", "Squeeze", "Flatten", "Identity"})
_INTEGER_TYPES = frozenset({
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
})


@dataclass(frozen=True)
class IndexLimit:
    """An input indexes `rows` rows of initializer `table` (through Gather node `node`): its values are 0..rows-1."""

    rows: int
    table: str
    node: str


def index_limits(model: onnx.ModelProto) -> dict[str, IndexLimit]:
    """Integer graph inputs that index an initializer's rows, with the smallest such table each reaches."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    limits: dict[str, IndexLimit] = {}
    for value in graph.input:
        if value.name in initializers or value.type.tensor_type.elem_type not in _INTEGER_TYPES:
            continue
        for limit in _tables_reached(value.name, consumers, initializers):
            if value.name not in limits or limit.rows < limits[value.name].rows:
                limits[value.name] = limit
    return limits


def _tables_reached(name: str, consumers: Mapping[str, list[onnx.NodeProto]],
                    initializers: Mapping[str, onnx.TensorProto]) -> Iterable[IndexLimit]:
    seen, todo = {name}, [name]
    while todo:
        current = todo.pop()
        for node in consumers.get(current, []):
            if node.op_type in _VALUE_KEEPING and node.domain in ("", "ai.onnx") and node.input[0] == current:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        todo.append(out)
            elif (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) > 1
                  and node.input[1] == current and node.input[0] in initializers):
                table = initializers[node.input[0]]
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if -len(table.dims) <= axis < len(table.dims):
                    yield IndexLimit(int(table.dims[axis]), table.name, node.name or node.output[0])


def check_index_ranges(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], source: str) -> None:
    """CalibrationError naming the input, the first value outside 0..V-1 and V, for inputs that index a table.

    Negative ids are refused too: ONNX reads -1 as the last row, which no tokenizer means.
    """
    limits = index_limits(model)
    if not limits:
        return
    for feed in feeds:
        for name, limit in limits.items():
            array = feed.get(name)
            if array is None or array.size == 0:
                continue
            low, high = array.min(), array.max()
            if low >= 0 and high < limit.rows:
                continue
            bad = int(low) if low < 0 else int(high)
            raise CalibrationError(
                f"{source}: input {name!r} holds the value {bad}, but it indexes the {limit.rows} rows "
                f"of {limit.table!r} (Gather {limit.node!r}): its values must be 0 to {limit.rows - 1}. Check that "
                "the samples were made with the model's own tokenizer or vocabulary (no padding id like -1 or -100)"
            )
