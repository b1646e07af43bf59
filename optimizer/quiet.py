"""ONNX Runtime's quantization tools' warnings, at debug level under our logging instead of on stderr.

They log through the root logger (`logging.warning(...)` in onnxruntime/quantization/*.py), which also gives the root
logger a stderr handler on first use: `onnxforge optimize` and bench/auto.py printed lines such as
"WARNING:root:Please use QuantFormat.QDQ for activation type QInt8 and weight type QInt8. Or it will lead to bad
performance on x64." amid their own, twice per build, advice about choices the optimizer makes on purpose.
`route_ort_warnings()` puts a filter on the root logger that takes those records (below ERROR, logged on the root
logger from a file of the onnxruntime package) and logs them again on the "onnxruntime.quantization" logger at debug
level: shown with --log-level debug, never by default. ORT's errors, and everyone else's root records, pass
untouched.
"""

from __future__ import annotations

import logging
import os
from functools import cache

#: The logger ORT's root warnings are logged on again, at debug level.
ROUTED_TO = "onnxruntime.quantization"


@cache
def _ort_dir() -> str:
    """The onnxruntime package's folder (with a trailing separator), where the records to route come from."""
    import onnxruntime

    return os.path.dirname(os.path.abspath(onnxruntime.__file__)) + os.sep


class _OrtRootWarnings(logging.Filter):
    """On the root logger: a record below ERROR from ONNX Runtime's own code goes to ROUTED_TO at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.pathname.startswith(_ort_dir()):
            return True
        routed = logging.getLogger(ROUTED_TO)
        if routed.isEnabledFor(logging.DEBUG):
            routed.debug("%s (%s from %s:%d)", record.getMessage(), record.levelname,
                         os.path.relpath(record.pathname, _ort_dir()), record.lineno)
        return False


_FILTER = _OrtRootWarnings()


def route_ort_warnings() -> None:
    """Install the filter on the root logger (once; calling again does nothing). Call before ORT's quantization
    tools run: in a command's main, or where the library calls them."""
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)
