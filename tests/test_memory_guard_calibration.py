"""A calibration set's sample count is capped before any array is read (security review, finding 2).

A 125 KB .npz of 4M rows of 8 zeros declared 122 MiB, under the 2 GiB cap on declared bytes, and took 1.7 GiB and
109 s of the API process: every row became a Python object before the split. Now a set of more than MAX_SAMPLES is
refused from its .npy header (a 400 at upload), and only the samples the split picks are made into feeds.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from optimizer.calibration import MAX_SAMPLES, load_samples, read_samples
from optimizer.errors import CalibrationError
from tests import models
from tests.conftest import assert_only_good_serves, post_bad, serving_good_model


def _zeros_npz(name: str, shape: tuple[int, ...], data: bool = True) -> bytes:
    """An .npz of one float32 array of zeros, deflated (a few KB for millions of rows); `data=False` writes the header
    only, so reading the array would fail as corrupt: a refusal that names the count did not read it."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    with (zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive,
          archive.open(f"{name}.npy", "w", force_zip64=True) as member):
        member.write(header.getvalue())
        if data:
            member.write(bytes(4 * int(np.prod(shape))))
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(MAX_SAMPLES + 1, 8), (MAX_SAMPLES + 1, 1, 8)], ids=["batch-axis", "rank+1"])
def test_more_samples_than_the_cap_are_refused_from_the_header(shape: tuple[int, ...]) -> None:
    model = models.mlp(features=8, hidden=4, classes=2)
    for read in (load_samples, read_samples):
        with pytest.raises(CalibrationError, match=rf"holds {MAX_SAMPLES + 1} samples; at most {MAX_SAMPLES} are read"):
            read(_zeros_npz("features", shape, data=False), model)


def test_a_set_at_the_cap_is_read_and_split_as_before() -> None:
    samples = load_samples(_zeros_npz("features", (MAX_SAMPLES, 8)), models.mlp(features=8, hidden=4, classes=2))
    assert (len(samples.calibration), len(samples.holdout), samples.offered) == (256, MAX_SAMPLES // 5, 80_000)
    assert {f["features"].shape for f in [*samples.calibration, *samples.holdout]} == {(1, 8)}


def test_a_rank0_input_of_a_capped_set_still_gives_0d_arrays() -> None:
    """Samples gathered from a larger set (the copy path) are 0-d arrays too, not numpy scalars ONNX Runtime refuses."""
    model = models.scalar_input()
    samples = load_samples({"x": np.ones((40, 1, 4), np.float32), "sr": np.arange(40, dtype=np.int64)}, model,
                           max_calibration=3)
    assert len(samples.calibration) == 3 and samples.offered == 32
    assert all(isinstance(f["sr"], np.ndarray) and f["sr"].shape == () for f in samples.calibration + samples.holdout)


def test_an_upload_with_too_many_samples_is_a_400_naming_the_cap(tmp_path: Path) -> None:
    with serving_good_model(tmp_path) as api:
        answer = post_bad(api, models.mlp().SerializeToString(), _zeros_npz("features", (MAX_SAMPLES + 1, 64)))
        assert answer.status_code == 400, answer.text
        assert f"at most {MAX_SAMPLES} are read" in answer.text
        assert_only_good_serves(api)
