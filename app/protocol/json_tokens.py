"""JSON with NaN, Infinity and -Infinity tokens, read where orjson refuses them.

WHY: Python's `json.dumps` (tritonclient, `requests.post(json=...)`) writes float NaN/Inf as those bare tokens, and
Triton reads them (rapidjson's kParseNanAndInfFlag); orjson, our fast parser, refuses the whole document. Only a
document orjson refused and that holds such a token takes this slower path; what orjson refuses besides them (lone
surrogates...) is refused still.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads_with_nan_tokens(data: bytes) -> Any | None:  # noqa: ANN401 - parsed JSON
    """`data` parsed by Python's json when it holds a NaN/Infinity token and nothing else orjson refuses; else None
    (the caller answers with orjson's own error)."""
    if b"NaN" not in data and b"Infinity" not in data:
        return None
    try:
        parsed = json.loads(data)
        orjson.dumps(parsed)  # orjson's other refusals: the same document without those tokens is refused
    except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, orjson.JSONEncodeError
        return None
    return parsed
