"""The GPU benchmark script runs end to end in its smallest form (CPU, tiny encoder, a few requests)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_device_run_smallest_form(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        ["bash", "benchmarks/device_run.sh", "--small"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
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
    assert "figure" in proc.stdout and "target" in proc.stdout  # the one table was printed
    for name in ("model.json", "serving.json", "trainer.json"):
        assert (tmp_path / "out" / name).is_file()
    # the trainer's step is counted op by op (the launch-bound GPU step's cost) and printed
    trainer = json.loads((tmp_path / "out" / "trainer.json").read_text())
    for m in trainer["methods"]:
        assert m["ops_per_it"] > 100 and m["syncs_per_it"] >= 0, m
    assert "ops/it" in proc.stdout
