"""The GPU benchmark script runs end to end in its smallest form (CPU, tiny encoder, a few requests),
through the GPU queue's `perf` item (benchmarks/gpu/run.sh perf --small: device_run.sh --small, then the
graph-ready trainer step of every method), so device_run.sh runs once in the suite."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)  # device_run's smallest form takes about 4 minutes on a quiet 2-core machine
def test_device_run_smallest_form(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "perf", "--small", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "logs" / "device_run.log").read_text()
    summary = json.loads((tmp_path / "device_run" / "summary.json").read_text())
    figures = summary["figures"]
    for key in (
        "cold model-alone slices/s",
        "warm Redis-path slices/s",
        "warm Redis path ÷ model alone",
        "REST volume/request ÷ model alone (cold)",
        "trainer VESSA ÷ BCP iteration rate",
        "time/slice spread over 1…512 slices/request",
    ):
        assert key in figures and figures[key] == figures[key] and figures[key] > 0, key  # measured, not NaN
    assert "figure" in log and "target" in log  # device_run's one table was printed
    for name in ("model.json", "serving.json", "trainer.json"):
        assert (tmp_path / "device_run" / name).is_file()
    # the trainer's step is counted op by op (the launch-bound GPU step's cost) and printed
    trainer = json.loads((tmp_path / "device_run" / "trainer.json").read_text())
    for m in trainer["methods"]:
        assert m["ops_per_it"] > 100 and m["syncs_per_it"] >= 0, m
    assert "ops/it" in log
    assert summary["targets"]["cold model-alone slices/s"] == 5000.0  # issue 17's cold target
    # the queue item: its own table, and the graph-ready step of every method free of host syncs
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["ok"], res["checks"]
    assert "GPU queue item perf" in proc.stdout
    assert set(res["figures"]["graph_step_syncs_per_it"]) == {"supervised", "bcp_pretrain", "bcp", "bcp_vessa"}
    assert all(v == 0 for v in res["figures"]["graph_step_syncs_per_it"].values())
