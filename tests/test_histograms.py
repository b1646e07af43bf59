"""optimizer.histograms: our entropy threshold search returns exactly ONNX Runtime's thresholds.

Histograms are built by ORT's own HistogramCollector from data shaped like activations (symmetric,
post-ReLU with many zeros, heavy-tailed, a range that grows across chunks so bins are added unevenly),
and the thresholds compared bit for bit with ORT's get_entropy_threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, create_calibrator

from optimizer.histograms import FastHistogramCollector, entropy_threshold, use_fast_collector
from optimizer.passes.int8_static import _FeedReader
from tests import models


def _chunks(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "normal":
        return [rng.normal(0, 1, 4000).astype(np.float32)]
    if kind == "relu":  # half the values exactly zero, as after a ReLU
        return [np.maximum(rng.normal(0.2, 1, 4000), 0).astype(np.float32)]
    if kind == "heavy_tail":
        return [rng.standard_t(2, 4000).astype(np.float32)]
    if kind == "growing":  # each chunk wider than the last: merge_histogram adds bins on both sides
        # (twice as wide each time: ~4x the bins at the end; ONNX Runtime's reference threshold, which this is
        # compared to, costs the square of the bins: 8x wide took 25 s of the suite for these three cases)
        return [rng.normal(0, scale, 1500).astype(np.float32) for scale in (0.5, 1.0, 2.0)]
    if kind == "sparse":  # few distinct values: most bins empty
        return [rng.choice([-2.0, 0.0, 0.5, 3.0], 3000).astype(np.float32)]
    raise ValueError(kind)


def _histogram(kind: str, seed: int, num_bins: int, num_quantized_bins: int) -> tuple:
    collector = HistogramCollector("entropy", False, num_bins, num_quantized_bins, 99.999, "same")
    for chunk in _chunks(kind, np.random.default_rng(seed)):
        collector.collect_value({"t": [chunk]})
    return collector.histogram_dict["t"]


@pytest.mark.parametrize("kind", ["normal", "relu", "heavy_tail", "growing", "sparse"])
# (an odd number of quantized bins divides some kept slices exactly, so the last bin of p falls in a group)
@pytest.mark.parametrize(("num_bins", "num_quantized_bins"), [(512, 128), (300, 64), (300, 63)])
def test_thresholds_equal_onnxruntime_bit_for_bit(kind: str, num_bins: int, num_quantized_bins: int) -> None:
    for seed in range(3):
        histogram = _histogram(kind, seed, num_bins, num_quantized_bins)
        ours = entropy_threshold(histogram, num_quantized_bins)
        ort = HistogramCollector.get_entropy_threshold(None, histogram, num_quantized_bins)
        assert [np.asarray(v).tobytes() for v in ours] == [np.asarray(v).tobytes() for v in ort], (kind, seed)
        assert [np.asarray(v).dtype for v in ours] == [np.asarray(v).dtype for v in ort]
        assert ours[0] < ours[1]


def test_the_growing_histograms_really_exercise_uneven_bins() -> None:
    # (otherwise the "growing" case above would not test the leftover-bin quirk it is there for)
    sizes = {_histogram("growing", seed, 300, 64)[0].size for seed in range(3)}
    assert all(size > 300 for size in sizes)
    assert any(((size // 2 + i + 1) - (size // 2 - i)) % 64 for size in sizes for i in range(32, size // 2))


def test_a_calibrator_with_the_fast_collector_gives_onnxruntimes_ranges(tmp_path) -> None:
    model = models.cnn()
    path = tmp_path / "cnn.onnx"
    path.write_bytes(model.SerializeToString())
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(6)]
    options = {"num_bins": 512, "num_quantized_bins": 128}
    results = []
    for fast in (False, True):
        calibrator = create_calibrator(path, None, augmented_model_path=str(tmp_path / f"aug{fast}.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy, extra_options=options)
        if fast:
            use_fast_collector(calibrator)
        for start in (0, 3):  # two chunks, merged as in int8_static
            calibrator.collect_data(_FeedReader(feeds[start:start + 3]))
        assert isinstance(calibrator.collector, FastHistogramCollector) == fast
        results.append({name: tuple(float(v) for v in data.range_value)
                        for name, data in calibrator.compute_data().items()})
    assert len(results[0]) >= 5
    assert results[1] == results[0]
