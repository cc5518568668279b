"""The GPU queue (benchmarks/gpu/run.sh) runs every item end to end in its --small form on the CPU:
synthetic data (prepared once here as a `vessa data prepare` cache), the tiny encoder, a handful of
steps. Each item's own checks (a bank with exemplars, answers that arrived, a label map with foreground,
finite metrics for every volume) must pass and its result.json must say so. `perf --small` runs in
tests/e2e/test_benchmarks.py (it is device_run.sh's smallest form plus the graph-ready trainer), not here.
The N = 7 items run the same code as the N = 3 ones with other config files (configs/assistant/acdc_7_gpu.yaml,
configs/train/acdc_*_7_gpu.yaml), which tests/unit/assistant_server/test_assistant_recipe.py and
tests/unit/student_trainer/test_trainer_cli.py load and validate: only N = 3 runs here, to keep the suite
short (the N = 7 runs cost 2.7 minutes more on an idle 2-core machine).
Cost on 2 cores: about 4 minutes on a quiet machine (student items 10-30 s each, the assistant and VESSA
pair about 1.5 minutes, smoke about 2), several times that when the machine is loaded; the loop item
adds its own assistant (about 1 minute) and the embedded service with three labeling passes (3.4 minutes
in all at nice 19 beside other work, 2026-12-07)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def run_item(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """The item as the queue runs it; on a timeout or an interrupted test (pytest-timeout) the item gets
    SIGTERM, which stops the step it is running (benchmarks/gpu/queue.py), then SIGKILL."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = ["bash", "benchmarks/gpu/run.sh", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def passed(proc: subprocess.CompletedProcess, out: Path) -> dict:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    res = result(out)
    assert res["ok"] and res["checks"], res["checks"]
    assert "GPU queue item" in proc.stdout and "PASSED" in proc.stdout  # the one table was printed
    return res


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """14 synthetic cases (3-4 validation volumes, unlabeled patients left at N = 7), cached at 64²."""
    raw = tmp_path_factory.mktemp("queue_synth")
    out = tmp_path_factory.mktemp("queue_cache") / "cache"
    vessa = [str(ROOT / ".venv" / "bin" / "python"), "-m", "services.cli.main"]
    subprocess.run([*vessa, "data", "synth", str(raw), "--cases", "14", "--seed", "0"], cwd=ROOT, check=True)
    subprocess.run(
        [*vessa, "data", "prepare", str(raw), str(out), "--size", "64", "--workers", "1"],
        cwd=ROOT,
        check=True,
    )
    return out


def test_list_is_the_queue_in_order():
    proc = run_item("list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "smoke", "perf", "assistant-3", "bcp-3", "vessa-3", "loop-3", "supervised-3",
        "assistant-7", "bcp-7", "vessa-7", "loop-7", "supervised-7",
    ]  # fmt: skip
    bad = run_item("no-such-item", "--small")
    assert bad.returncode != 0 and "unknown item" in bad.stderr


@pytest.mark.timeout(1800)  # bounds for a loaded 2-core machine; each takes a minute or two unloaded
@pytest.mark.parametrize("item", ["bcp-3", "supervised-3"])
def test_student_item_small(item, cache, tmp_path):
    out = tmp_path / item
    res = passed(run_item(item, "--small", "--data", str(cache), "--out", str(out)), out)
    assert res["figures"]["completed_schedule"] is True
    assert res["figures"]["val_mean_dice"] is not None
    # the queue trains with the graph-ready step (configs/train/*_gpu.yaml)
    assert res["figures"]["graph_step"]["lcc_unconverged_steps"] == 0.0
    assert (out / "train" / "best.pt").is_file() and (out / "eval_val" / "metrics.json").is_file()


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("n", [3])
def test_assistant_then_vessa_items_small(n, cache, tmp_path):
    """assistant-N (recipe + eval), then vessa-N on its recipe folder, as the queue runs them in order
    on one machine; the test split is evaluated when --test is given (here: the same cache's val)."""
    a_out = tmp_path / f"assistant-{n}"
    res = passed(run_item(f"assistant-{n}", "--small", "--data", str(cache), "--out", str(a_out)), a_out)
    assert "templates" in res["figures"]["val_mean_dice"]
    assert (a_out / "bank").is_dir() and (a_out / "assistant.pt").is_file()
    v_out = tmp_path / f"vessa-{n}"
    args = ["--small", "--data", str(cache), "--out", str(v_out), "--assistant", str(a_out)]
    res = passed(run_item(f"vessa-{n}", *args), v_out)
    assert res["figures"]["assistant"] == str(a_out)  # reused, not rebuilt
    table = res["figures"]["graph_step"]
    assert table["table_answered"] > 0 and table["table_builds"] >= 2  # templates-only, then prompted


@pytest.mark.timeout(1800)
def test_loop_item_small(cache, tmp_path):
    """loop-3: `vessa label --rounds 2` with the embedded default (Serve, Redis, dispatcher) on the
    cache's validation volumes, written out as volumes with their ground truth (a cache holds none that
    `discover` reads). The --assistant folder holds no assistant, as on a machine where assistant-3 did
    not run: the item builds its own (a bank and one Stage-1 step)."""
    out = tmp_path / "loop-3"
    args = ["--small", "--data", str(cache), "--out", str(out), "--assistant", str(tmp_path / "no-assistant")]
    proc = run_item("loop-3", *args)
    res = passed(proc, out)
    fig = res["figures"]
    assert fig["assistant"] == str(out / "assistant") and fig["completed_schedule"] is True
    assert fig["data"] == str(out / "loop_data") and fig["cases"] >= 3
    rows = fig["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["cases"] == fig["cases"] and r["failed"] == 0 and r["dice"] is not None for r in rows)
    assert rows[0]["student_steps"] is None and [r["student_steps"] for r in rows[1:]] == [4, 4]
    assert all(r["pseudo_slices"] > 0 for r in rows[1:])
    assert (out / "job" / "rounds" / "2" / "student.pt").is_file()
    assert "student_steps" in proc.stdout  # the printed table shows the rounds as columns


@pytest.mark.timeout(3000)
def test_smoke_item_small(tmp_path):
    out = tmp_path / "smoke"
    res = passed(run_item("smoke", "--small", "--out", str(out), timeout=2700), out)
    names = {c["check"] for c in res["checks"]}
    for part in ("bank build", "Stage-1", "Serve app", "REST pseudo-labels", "Redis path", "BCP + VESSA trainer",
                 "vessa eval", "vessa predict"):  # fmt: skip
        assert any(n.startswith(part) for n in names), (part, names)


def test_text_vectors_file_replaces_the_text_model(tmp_path, monkeypatch):
    """Banks build on the GPU machine from class-text vectors computed here (pack.sh models): with
    VESSA_TEXT_VECTORS holding every text, the 88 MB text model is never loaded."""
    from assistant_server import text_embedding

    vectors = {"RV: right ventricle": [1.0, 0.0], "LV: left ventricle": [0.0, 1.0]}
    path = tmp_path / "text_vectors.json"
    path.write_text(json.dumps(vectors))
    monkeypatch.setenv("VESSA_TEXT_VECTORS", str(path))
    monkeypatch.setattr(
        text_embedding, "_model", lambda: (_ for _ in ()).throw(AssertionError("model loaded"))
    )
    out = text_embedding.embed_texts(["LV: left ventricle", "RV: right ventricle"])
    assert out.dtype.name == "float32" and out.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    with pytest.raises(AssertionError, match="model loaded"):  # a text it lacks: the model is asked
        text_embedding.embed_texts(["Myo: myocardium"])
