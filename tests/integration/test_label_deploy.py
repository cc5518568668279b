"""The compose defaults of issue 16, checked without Docker: the entry point trains Stage-1 before it
serves when no checkpoint is on the models volume (never untrained parts unless named), the `label`
role, and the compose `label` profile. (The Docker end-to-end run is tests/e2e/test_deploy_docker.py.)"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.unit.services.test_deploy_manifests import (
    COMPOSE,
    ENTRYPOINT,
    command_list,
    compose_config,
    load_compose,
)

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [ "$(basename "$0")" = vessa ] && [ "$1" = assistant ] && [ "$2" = train ]; then
  out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
  echo "stage-1 progress on stdout"; mkdir -p "$(dirname "$out")" && echo ckpt > "$out"
fi
exit 0
"""


def _entrypoint(tmp_path: Path, *args: str, **env: str) -> tuple[list[str], str]:
    if not shutil.which("flock"):
        pytest.skip("flock (util-linux) not installed")
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name in ("ray", "vessa"):
            p = bin_dir / name
            p.write_text(STUB)
            p.chmod(p.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "HOME": str(tmp_path), "VESSA_DATA_DIR": str(tmp_path / "data"), "VESSA_INIT_DATA": "0", "VESSA_MODELS_DIR": str(tmp_path / "models"), **env}
    r = subprocess.run(["bash", str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return (log.read_text().splitlines() if log.exists() else []), r.stderr


def test_assistant_trains_stage1_before_serving_when_no_checkpoint(tmp_path):
    calls, err = _entrypoint(tmp_path, "assistant", VESSA_STAGE1_ARGS="--steps 200 --device cpu")
    train = [c for c in calls if c.startswith("vessa assistant train")]
    assert len(train) == 1 and "--steps 200 --device cpu" in train[0]
    serve = next(c for c in calls if c.startswith("vessa serve"))
    assert f"--ckpt {tmp_path / 'models' / 'assistant.pt'}" in serve, "the trained checkpoint is served"
    assert calls.index(train[0]) < calls.index(serve)
    assert (tmp_path / "models" / "assistant.pt").is_file() and not (tmp_path / "models" / ".stage1.partial").exists()
    assert "training Stage-1" in err
    # the next start finds it and trains nothing
    calls, _ = _entrypoint(tmp_path, "assistant")
    assert not any(c.startswith("vessa assistant train") for c in calls)
    # untrained parts only by name
    calls, err = _entrypoint(tmp_path, "assistant", ASSISTANT_CKPT="pretrained")
    assert "--ckpt pretrained" in next(c for c in calls if c.startswith("vessa serve"))
    assert "as asked" in err


def test_label_role_labels_the_mounted_dataset_or_the_demo_one(tmp_path):
    data = tmp_path / "data"
    (data / "label-in").mkdir(parents=True)
    (data / "label-in" / "case1.nii.gz").write_bytes(b"x")
    calls, _ = _entrypoint(tmp_path, "label", "--classes", "3", LABEL_ARGS="--no-progress")
    assert calls == [f"vessa label --data {data / 'label-in'} --out /runs/labels --classes 3 --no-progress"]
    shutil.rmtree(data / "label-in")
    (data / "synth").mkdir()
    (data / "synth" / "dataset.json").write_text("{}")
    calls, err = _entrypoint(tmp_path, "label", VESSA_LABEL_OUT=str(tmp_path / "out"))
    assert calls == [f"vessa label --data {data / 'synth'} --out {tmp_path / 'out'} --all"]
    assert "nothing mounted" in err


def test_compose_label_profile_and_data_root():
    cfg = compose_config()
    label = cfg["services"]["label"]
    assert label["profiles"] == ["label"] and command_list(label) == ["label"]
    targets = {v.split(":")[1] for v in label["volumes"]}
    assert {"/data", "/data/label-in", "/runs/labels"} <= targets
    assert label["environment"]["VESSA_REDIS_URL"] == "redis://redis:6379/0"
    assert label["depends_on"]["assistant"]["condition"] == "service_healthy"
    host = compose_config({"LABEL_INPUT": "/scans", "LABEL_OUTPUT": "/srv/labels"})["services"]["label"]["volumes"]
    assert "/scans:/data/label-in:ro" in host and "/srv/labels:/runs/labels" in host
    a = cfg["services"]["assistant"]["environment"]
    assert a["VESSA_DATA_ROOT"] == "/data" and a["ASSISTANT_CKPT"] == ""
    assert {"vessa-label-in", "vessa-labels"} <= set(load_compose(COMPOSE)["volumes"])
    cpu = compose_config(cpu=True)["services"]
    assert cpu["label"]["network_mode"] == "host"
    assert "--device cpu" in cpu["assistant"]["environment"]["VESSA_STAGE1_ARGS"]
