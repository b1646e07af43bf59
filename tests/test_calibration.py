"""Calibration sample sets: both .npz layouts, every refusal a user can trigger, the holdout split."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

from optimizer.calibration import batch_axes, batch_feeds, load_samples, synthetic_samples
from optimizer.errors import CalibrationError
from optimizer.runtime import create_session
from tests import models


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def tagged_images(count: int, stacked: bool) -> np.ndarray:
    """Images whose every pixel equals the sample's index, so a sample can be identified after the split."""
    shape = (count, 1, 3, 32, 32) if stacked else (count, 3, 32, 32)
    return np.broadcast_to(np.arange(count, dtype=np.float32).reshape(-1, *[1] * (len(shape) - 1)), shape).copy()


def sample_ids(feeds: list[dict]) -> set[int]:
    return {int(feed["image"].flat[0]) for feed in feeds}


@pytest.fixture(scope="module")
def cnn():
    return models.cnn()


@pytest.fixture(scope="module")
def transformer():
    return models.transformer()


@pytest.mark.parametrize("stacked", [True, False], ids=["rank+1", "batch-axis"])
def test_both_layouts_give_batch1_samples_split_disjointly(cnn, stacked, tmp_path):
    path = tmp_path / "samples.npz"
    path.write_bytes(npz(image=tagged_images(10, stacked)))
    samples = load_samples(path, cnn)
    assert (len(samples.calibration), len(samples.holdout)) == (6, 4)  # 20% of 10 is 2, min_holdout 4
    assert not samples.synthetic and samples.source == "samples.npz"
    for feed in samples.calibration + samples.holdout:
        assert feed["image"].shape == (1, 3, 32, 32) and feed["image"].dtype == np.float32
    calibration, holdout = sample_ids(samples.calibration), sample_ids(samples.holdout)
    assert calibration.isdisjoint(holdout) and calibration | holdout == set(range(10))
    # The feeds are real ONNX Runtime feeds.
    session = create_session(cnn.SerializeToString())
    assert session.run(None, samples.holdout[0])[0].shape == (1, 10)


def test_holdout_fraction_and_seed(cnn):
    data = npz(image=tagged_images(40, stacked=False))
    samples = load_samples(data, cnn, holdout_fraction=0.25)
    assert (len(samples.calibration), len(samples.holdout)) == (30, 10)
    assert sample_ids(load_samples(data, cnn, seed=1).holdout) != sample_ids(load_samples(data, cnn).holdout)
    assert sample_ids(load_samples(data, cnn).holdout) == sample_ids(load_samples(data, cnn).holdout)


def test_stacked_samples_may_carry_a_batch(transformer):
    hidden = np.random.default_rng(0).normal(size=(5, 2, 8, 64)).astype(np.float32)
    mask = np.ones((5, 2, 8), np.int64)
    samples = load_samples(npz(hidden_states=hidden, attention_mask=mask), transformer)
    assert len(samples.calibration) + len(samples.holdout) == 5
    assert samples.holdout[0]["hidden_states"].shape == (2, 8, 64)
    assert samples.holdout[0]["attention_mask"].shape == (2, 8)


def test_few_samples_are_split_with_a_note(cnn):
    samples = load_samples(npz(image=tagged_images(5, stacked=False)), cnn)
    assert (len(samples.calibration), len(samples.holdout)) == (3, 2)
    assert any("only 5 samples" in note for note in samples.notes)


def test_lossless_casts_are_applied_with_a_note(transformer):
    hidden = np.random.default_rng(0).normal(size=(4, 8, 64))  # float64, numpy's default
    mask = np.ones((4, 8), np.int32)
    samples = load_samples(npz(hidden_states=hidden, attention_mask=mask), transformer)
    feed = samples.holdout[0]
    assert feed["hidden_states"].dtype == np.float32 and feed["attention_mask"].dtype == np.int64
    assert any("float64 to float32" in n for n in samples.notes)
    assert any("int32 to int64" in n for n in samples.notes)


def test_missing_or_unknown_input_is_named(transformer):
    data = npz(hidden_states=np.zeros((4, 8, 64), np.float32), mask=np.ones((4, 8), np.int64))
    with pytest.raises(CalibrationError) as err:
        load_samples(data, transformer)
    message = str(err.value)
    assert "attention_mask" in message and "'mask'" in message
    assert "['hidden_states', 'attention_mask']" in message  # the model's inputs are listed


def test_wrong_shape_names_input_expected_and_given(cnn):
    with pytest.raises(CalibrationError) as err:
        load_samples(npz(image=np.zeros((10, 3, 16, 16), np.float32)), cnn)
    message = str(err.value)
    assert "'image'" in message and "[batch, 3, 32, 32]" in message and "[10, 3, 16, 16]" in message


def test_wrong_rank_is_refused(cnn):
    with pytest.raises(CalibrationError, match=r"'image'.*\[3, 32\].*fits neither layout"):
        load_samples(npz(image=np.zeros((3, 32), np.float32)), cnn)


def test_wrong_dtype_is_refused(cnn):
    with pytest.raises(CalibrationError) as err:
        load_samples(npz(image=np.zeros((4, 3, 32, 32), np.int32)), cnn)
    message = str(err.value)
    assert "'image'" in message and "float32" in message and "int32" in message


def test_integer_cast_that_loses_values_is_refused(transformer):
    mask = np.full((4, 8), 2**63 + 5, np.uint64)
    data = npz(hidden_states=np.zeros((4, 8, 64), np.float32), attention_mask=mask)
    with pytest.raises(CalibrationError, match="'attention_mask'.*outside the range of int64"):
        load_samples(data, transformer)


def test_nan_is_refused(cnn):
    images = tagged_images(4, stacked=False)
    images[2, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="'image' contains NaN"):
        load_samples(npz(image=images), cnn)


def test_shared_dynamic_dims_must_agree(transformer):
    data = npz(hidden_states=np.zeros((4, 8, 64), np.float32), attention_mask=np.ones((4, 10), np.int64))
    with pytest.raises(CalibrationError, match="seq=10.*seq=8|seq=8.*seq=10"):
        load_samples(data, transformer)


def test_sample_counts_must_agree(transformer):
    data = npz(hidden_states=np.zeros((4, 8, 64), np.float32), attention_mask=np.ones((3, 8), np.int64))
    with pytest.raises(CalibrationError, match="different numbers of samples.*'hidden_states': 4.*'attention_mask': 3"):
        load_samples(data, transformer)


def test_pickle_inside_is_refused(cnn):
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, {"b": 2}]
    with pytest.raises(CalibrationError, match="'image' holds Python objects"):
        load_samples(npz(image=objects), cnn)


def test_not_a_zip_is_refused(cnn):
    with pytest.raises(CalibrationError, match="not a .npz file"):
        load_samples(np.random.default_rng(0).bytes(1000), cnn)


def test_truncated_file_is_refused(cnn):
    data = npz(image=tagged_images(10, stacked=False))
    with pytest.raises(CalibrationError):
        load_samples(data[: len(data) // 2], cnn)


def test_corrupt_array_data_is_refused(cnn):
    """A member whose header is fine but whose data is cut short fails as corrupt, not with a traceback."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (4, 3, 32, 32)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("image.npy", header.getvalue() + b"\0" * 100)
    with pytest.raises(CalibrationError, match="corrupt"):
        load_samples(buffer.getvalue(), cnn)


def test_declared_size_is_checked_before_loading(cnn):
    """A zip bomb in spirit: a tiny member whose header declares 4 GB is refused without reading it."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**9,)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(CalibrationError, match="more than 2147483648 bytes"):
        load_samples(buffer.getvalue(), cnn)
    with pytest.raises(CalibrationError, match="more than 1000 bytes"):
        load_samples(npz(image=tagged_images(4, stacked=False)), cnn, max_bytes=1000)


def test_too_few_samples_is_refused_with_shapes(cnn):
    with pytest.raises(CalibrationError) as err:
        load_samples(npz(image=np.zeros((1, 3, 32, 32), np.float32)), cnn)
    message = str(err.value)
    assert "1 sample" in message and "image: [1, 3, 32, 32]" in message


def test_the_sample_counts_the_refusal_names_are_where_the_notes_change_and_the_readme_says_so(cnn):
    """The refusal of a 1-sample set said 20 (min_holdout * 5) samples give meaningful numbers, while 20 samples hold
    back 4 and the report's accuracy notes call a cosine on fewer than 20 held back unproven; the README said 20 too."""
    import re
    from pathlib import Path

    from optimizer.pipeline import FEW_SAMPLES

    with pytest.raises(CalibrationError) as err:
        load_samples(npz(image=tagged_images(1, stacked=False)), cnn)
    rough, meaningful = map(int, re.search(r"fewer than (\d+) \(fewer than 4 held back\).* (\d+) or more \(20 or more "
                                           r"held back\) give meaningful", str(err.value)).groups())
    assert (rough, meaningful) == (8, 96) and FEW_SAMPLES == 20

    def split(n: int):  # noqa: ANN202
        return load_samples(npz(image=tagged_images(n, stacked=False)), cnn)

    assert any("rough" in note for note in split(rough - 1).notes)
    assert not any("rough" in note for note in split(rough).notes)
    assert len(split(meaningful - 1).holdout) < FEW_SAMPLES <= len(split(meaningful).holdout)
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert f"with fewer than {rough} (fewer than 4 held back)" in readme
    assert f"{meaningful} or more (20 or more held back" in readme


def test_synthetic_samples_are_plausible_and_run(transformer):
    samples = synthetic_samples(transformer, count=3, dynamic_dim=5)
    assert samples.synthetic and samples.calibration == [] and len(samples.holdout) == 3
    feed = samples.holdout[0]
    assert feed["hidden_states"].shape == (1, 5, 64) and feed["hidden_states"].dtype == np.float32
    assert feed["attention_mask"].dtype == np.int64 and np.all(feed["attention_mask"] == 1)
    assert not np.array_equal(samples.holdout[0]["hidden_states"], samples.holdout[1]["hidden_states"])
    assert create_session(transformer.SerializeToString()).run(None, feed)[0].shape == (1, 5, 64)


def test_synthetic_samples_find_a_batch_axis_that_is_not_first():
    lstm = models.lstm()
    feed = synthetic_samples(lstm, count=1, batch=3).holdout[0]
    assert feed["sequence"].shape == (8, 3, 16)


def test_batch_feeds_concatenates_along_each_batch_axis():
    lstm = models.lstm()
    axes = batch_axes(lstm)
    assert axes == {"sequence": 1}
    feeds = synthetic_samples(lstm, count=5).holdout
    batched = batch_feeds(feeds, 2, axes)
    assert len(batched) == 2 and batched[0]["sequence"].shape == (8, 2, 16)
    assert np.array_equal(batched[1]["sequence"][:, 1], feeds[3]["sequence"][:, 0])
    assert create_session(lstm.SerializeToString()).run(None, batched[0])[0].shape == (2, 4)
    # Fewer samples than the batch: repeated to fill one batch.
    assert batch_feeds(feeds[:2], 4, axes)[0]["sequence"].shape == (8, 4, 16)


def test_batch_axes_none_when_the_batch_is_static(cnn):
    static = models.cnn()
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert batch_axes(cnn) == {"image": 0}
    assert batch_axes(static) is None


def test_dim_value_minus_one_counts_as_dynamic() -> None:
    """Old exporters (Paddle OCR models) write -1 for a dynamic batch dim; ONNX Runtime accepts any batch there."""
    model = models.cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    samples = np.random.default_rng(0).normal(size=(10, 1, 3, 32, 32)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, image=samples)
    loaded = load_samples(buffer.getvalue(), model)
    assert len(loaded.calibration) + len(loaded.holdout) == 10
    assert loaded.holdout[0]["image"].shape == (1, 3, 32, 32)


def test_a_scalar_input_gives_0d_array_samples_that_onnx_runtime_runs():
    """Silero VAD takes its sample rate as a rank-0 input: each sample must be a 0-d array, not a numpy scalar."""
    model = models.scalar_input()
    raw = npz(x=np.ones((10, 1, 4), np.float32), sr=np.full(10, 16000, np.int64))
    samples = load_samples(raw, model, holdout_fraction=0.2)
    feed = samples.calibration[0]
    assert isinstance(feed["sr"], np.ndarray) and feed["sr"].shape == ()
    (y,) = create_session(model.SerializeToString()).run(None, feed)
    np.testing.assert_allclose(y, np.full((1, 4), 16000.0))
