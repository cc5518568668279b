"""`vessa data synth | info | prepare` through the real CLI app."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()


def _ok(args, env=None):
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "synth"
    result = _ok(["data", "synth", str(out), "--cases", "4", "--seed", "3"])
    assert "4 synthetic cases" in result.output
    return out


@pytest.mark.parametrize("cmd", [[], ["synth"], ["info"], ["prepare"]])
def test_help(cmd):
    result = _ok(["data", *cmd, "--help"])
    assert "Usage" in result.output


def test_synth_writes_layout_and_config(synth_dir):
    assert (synth_dir / "dataset.json").is_file() and (synth_dir / "splits.json").is_file()
    config = yaml.safe_load((synth_dir / "config.resolved.yaml").read_text())
    assert config["cases"] == 4 and config["seed"] == 3 and config["layout"] == "msd"


def test_info_text_and_json(synth_dir):
    text = _ok(["data", "info", str(synth_dir)]).output
    assert "msd-nifti" in text and "training slices" in text and "spacing (mm)" in text
    result = _ok(["data", "info", str(synth_dir), "--json"])
    info = json.loads(result.stdout)
    assert info["format"] == "msd-nifti" and info["patients"] == 2
    assert info["volumes"]["val"]["count"] == 2
    assert [c["index"] for c in info["classes"]] == [0, 1, 2, 3]
    assert all(v > 0 for v in info["label_counts"]["training_slices"])
    assert 5 <= info["spacing_mm"]["z"][0] <= info["spacing_mm"]["z"][1] <= 10


def test_prepare_and_info_on_cache(synth_dir, tmp_path):
    out = tmp_path / "cache"
    result = _ok(["data", "prepare", str(synth_dir), str(out), "--size", "64"])
    assert "MB" in result.output
    assert (out / "vessa_cache.json").is_file()
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["size"] == 64
    info = json.loads(_ok(["data", "info", str(out), "--json"]).stdout)
    assert info["format"] == "vessa-cache" and info["slice_shape"]["height"] == [64, 64]


def test_config_file_env_and_show_config(tmp_path):
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("cases: 9\nseed: 5\n")
    shown = yaml.safe_load(
        _ok(["data", "synth", str(tmp_path / "x"), "--config", str(cfg), "--show-config"]).stdout
    )
    assert shown["cases"] == 9 and shown["seed"] == 5
    shown = yaml.safe_load(
        _ok(
            ["data", "synth", str(tmp_path / "x"), "--config", str(cfg), "--show-config"],
            env={"VESSA_SYNTH_CASES": "6"},
        ).stdout
    )
    assert shown["cases"] == 6  # environment beats the file
    shown = yaml.safe_load(
        _ok(
            ["data", "synth", str(tmp_path / "x"), "--config", str(cfg), "--cases", "7", "--show-config"]
        ).stdout
    )
    assert shown["cases"] == 7  # flags beat both
    assert not (tmp_path / "x").exists()  # --show-config writes nothing


def test_errors_are_reported(tmp_path):
    result = runner.invoke(app, ["data", "info", str(tmp_path)])
    assert result.exit_code == 1 and "not a known dataset layout" in result.output
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "y"), "--cases", "2"])
    assert result.exit_code == 1 and "validation" in result.output


def test_ssl4mis_layout_option(tmp_path):
    _ok(
        [
            "data",
            "synth",
            str(tmp_path / "h5"),
            "--cases",
            "3",
            "--layout",
            "ssl4mis",
            "--val-fraction",
            "0.3",
        ]
    )
    info = json.loads(_ok(["data", "info", str(tmp_path / "h5"), "--json"]).stdout)
    assert info["format"] == "ssl4mis-h5" and info["volumes"]["val"]["count"] == 2
