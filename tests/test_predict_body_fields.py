"""A predict body's unknown field is a 400 naming it (user review: a misspelt "varient" was ignored and the default
variant answered, as if the client had asked for it), on the fast path and the normal stack alike."""

from __future__ import annotations

from tests import models


def test_an_unknown_predict_field_is_refused_by_name(serve) -> None:  # noqa: ANN001
    feed = models.random_feed(models.mlp(), batch=1)
    with serve() as api:
        accepted = api.upload(models.mlp(), name="m", precision="fp32")
        assert api.wait(accepted.json()["job_id"])["status"] == "succeeded"
        assert api.predict("m", feed, variant="original").status_code == 200
        for path in ("/v1/models/m/predict", "/v1/models/m/versions/1/predict"):
            answer = api.predict("m", feed, varient="original") if path.endswith("s/m/predict") else \
                api.client.post(path, json={"inputs": {k: v.tolist() for k, v in feed.items()}, "output_names": ["y"]})
            assert answer.status_code == 400, answer.text
            assert "unknown field" in answer.json()["error"] and ("'varient'" in answer.text or "'output_names'"
                                                                  in answer.text), answer.text
            assert "inputs and variant" in answer.json()["error"], answer.text
