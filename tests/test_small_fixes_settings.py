"""Every numeric ONNXFORGE_* setting refuses inf, nan and values out of its range at startup with one error line
naming the variable and the range (ONNXFORGE_PREDICT_TIME_LIMIT_S=inf was taken: a predict never timed out)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import Settings, allowed_range
from tests.test_ops_hygiene import _cli, _one_error_line

NUMERIC = [name for name, info in Settings.model_fields.items() if info.annotation in (int, float)]


def _bounded_above(name: str) -> bool:
    return any(word in (allowed_range(name) or "") for word in (" to ", "at most"))


def test_every_numeric_setting_has_a_finite_range() -> None:
    assert "predict_time_limit_s" in NUMERIC and "port" in NUMERIC and len(NUMERIC) >= 20, NUMERIC
    unbounded = [name for name in NUMERIC if "bytes" not in name and not _bounded_above(name)]
    # sizes in bytes or MiB and counts whose only absurd value is below their minimum may stay open above
    assert set(unbounded) <= {"max_input_elements", "job_memory_limit_mb", "max_concurrent_jobs",
                              "session_cache_max_mb", "max_concurrent_validations"}, unbounded


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e30", "-1"])
def test_a_numeric_setting_refuses_infinite_and_absurd_values_naming_its_range(name: str, value: str) -> None:
    if value == "1e30" and not _bounded_above(name):
        return  # no upper bound (bytes, MiB, counts)
    if value == "-1" and name == "port":
        value = "65536"
    with pytest.raises(ValidationError) as refused:
        Settings(**{name: value})
    message = refused.value.errors()[0]["msg"].removeprefix("Value error, ")
    assert message.startswith(f"must be {allowed_range(name)}"), message


def test_zero_still_means_no_limit_where_documented() -> None:
    assert Settings(predict_time_limit_s="0").predict_time_limit_s == 0
    assert Settings(job_memory_limit_mb="0").job_memory_limit_mb == 0
    assert allowed_range("predict_time_limit_s") == "from 0 to 3600 seconds"


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("ONNXFORGE_PREDICT_TIME_LIMIT_S", "inf", "ONNXFORGE_PREDICT_TIME_LIMIT_S: must be from 0 to 3600 seconds "
                                              "(0: no limit) (got 'inf')"),
    ("ONNXFORGE_BATCH_MAX_DELAY_MS", "nan", "ONNXFORGE_BATCH_MAX_DELAY_MS: must be from 0 to 1000 ms (got 'nan')"),
    ("ONNXFORGE_WORKERS", "100000", "ONNXFORGE_WORKERS: must be a whole number from 1 to 256 (got '100000')"),
    ("ONNXFORGE_JOB_TIME_LIMIT_S", "inf", "ONNXFORGE_JOB_TIME_LIMIT_S: must be over 0 and at most 604800 seconds"),
])
def test_serve_says_the_variable_and_its_range_in_one_line(variable: str, value: str, said: str, tmp_path) -> None:  # noqa: ANN001
    _one_error_line(_cli(["serve"], {variable: value}, tmp_path), said)
