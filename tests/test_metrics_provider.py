"""/metrics names the execution provider the process serves on: latencies mean little without it, and a replica that
fell back from CUDA to the CPU must be visible where its latencies are scraped."""

from __future__ import annotations

import re

from optimizer.runtime import resolve_provider


def test_metrics_names_the_provider_this_process_serves_on(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        text = api.client.get("/metrics").text
    series = re.findall(r'^onnxforge_execution_provider\{provider="([a-z]+)"\} 1\.0$', text, flags=re.MULTILINE)
    # Exactly one provider: what the service resolved (the CPU here; "cuda" only with onnxruntime-gpu and a GPU).
    assert series == [resolve_provider("auto")], text[-800:]
    assert "# TYPE onnxforge_execution_provider gauge" in text
