"""Peak memory of validating an upload: optimizer.loading.load_model, and the API's whole validate_upload.

Each measurement runs in a fresh child process: it imports everything and validates a tiny model first
(ONNX Runtime's and onnx's one-time allocations), resets the kernel's high-water mark
(/proc/self/clear_refs), validates the model, and reports the peak resident memory above where it
started, as a multiple of the file's size. Linux only.

    python bench/loading_memory.py [model.onnx ...]     (default: a ~100 MB MLP and bench's MiniLM if fetched)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MINILM = Path.home() / ".cache" / "onnxforge-bench" / "models" / "minilm.onnx"
MODES = ("load_model", "validate_upload")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(path: Path, mode: str) -> None:
    """Validate `path` once (after a warm-up) and print {"peak_mib": ..., "held_mib": ...} as JSON."""
    from app.services.uploads import ValidationLimiter, validate_upload
    from optimizer.loading import load_model
    from tests import models

    def run(model: Path) -> object:
        if mode == "load_model":
            return load_model(model)
        copy = Path(tempfile.mkdtemp()) / "upload.onnx"  # validate_upload may rewrite the file: work on a copy
        shutil.copyfile(model, copy)
        return validate_upload(copy, "model.onnx", None, {}, ValidationLimiter(1, 1.0))

    with tempfile.TemporaryDirectory() as folder:
        tiny = Path(folder) / "tiny.onnx"
        tiny.write_bytes(models.mlp().SerializeToString())
        run(tiny)
    start = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    result = run(path)
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - start, "held_mib": _status_mib("VmRSS") - start}))
    del result


def _measure(path: Path, mode: str) -> dict[str, float]:
    output = subprocess.run([sys.executable, __file__, "--child", str(path), mode], check=True,
                            capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(paths: list[Path]) -> None:
    from bench.machine import describe

    made = None
    if not paths:
        from tests import models

        model = models.mlp(features=256, hidden=5000)
        made = Path(tempfile.mkdtemp()) / "mlp_100mb.onnx"
        made.write_bytes(model.SerializeToString())
        # The same model as Paddle2ONNX names its dynamic dimensions ('?'): loading changes it (clears the
        # names), so the checks read a rewritten copy instead of the user's file.
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "?"
        changed = made.with_name("mlp_100mb_renamed.onnx")
        changed.write_bytes(model.SerializeToString())
        del model
        paths = [made, changed] + ([MINILM] if MINILM.is_file() else [])
    print(f"# {describe()}; load average {os.getloadavg()[0]:.2f}")
    print(f"# python bench/loading_memory.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{'model':28s} {'MiB':>6s} {'mode':16s} {'peak MiB':>9s} {'peak/file':>9s} {'held MiB':>9s}")
    try:
        for path in paths:
            size = path.stat().st_size / 2**20
            for mode in MODES:
                got = _measure(path, mode)
                print(f"{path.name:28s} {size:6.0f} {mode:16s} {got['peak_mib']:9.0f} {got['peak_mib'] / size:9.1f} "
                      f"{got['held_mib']:9.0f}")
    finally:
        if made is not None:
            shutil.rmtree(made.parent, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(Path(sys.argv[2]), sys.argv[3])
    else:
        main([Path(p) for p in sys.argv[1:]])
