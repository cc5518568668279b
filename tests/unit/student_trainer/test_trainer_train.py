"""End-to-end runs of the student trainer on tiny synthetic data (CPU, 64×64 input, a few iterations):
every method runs, writes checkpoints and resolved configs; resume continues bit-exactly; bcp_vessa
falls back to its teacher when the assistant never answers and uses its answers when it does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from shared.config import load_settings
from student_trainer.assistant_link import PseudoLabelResult
from student_trainer.checkpoint import load_checkpoint, model_from_checkpoint
from student_trainer.config import TrainSettings
from student_trainer.train import Trainer, train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from shared.data.synth import write_msd_dataset

    out = tmp_path_factory.mktemp("trainer_synth")
    write_msd_dataset(out, cases=6, seed=3)  # 4 training patients, 2 validation volumes
    return out


def tiny_cfg(synth, out_dir, method, **kw) -> TrainSettings:
    base = {
        "method": method,
        "out_dir": out_dir,
        "device": "cpu",
        "progress": False,
        "data": {"root": synth, "n_labeled": 2, "image_size": 64},
        "batch_size": 4,
        "labeled_bs": 2,
        "max_iters": 4,
        "val_every": 2,
        "save_every": 2,
        "log_every": 1,
        "bcp": {"pretrain_iters": 2},
        "final_eval": False,
    }
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(TrainSettings, None, **base)


def _check_outputs(out_dir, method, step):
    for name in ("latest.pt", "best.pt", "config.resolved.yaml", "latest.config.yaml", "best.config.yaml"):
        assert (out_dir / name).is_file(), name
    ckpt = torch.load(out_dir / "latest.pt", weights_only=True)  # plain tensors and simple types only
    assert ckpt["method"] == method and ckpt["step"] == step
    cfg = json.loads(ckpt["config"])
    assert cfg["method"] == method
    resolved = yaml.safe_load((out_dir / "config.resolved.yaml").read_text())
    assert resolved["method"] == method and resolved["data"]["image_size"] == 64
    model, classes, size = model_from_checkpoint(load_checkpoint(out_dir / "best.pt"))
    assert size == 64 and [c.name for c in classes] == ["background", "RV", "Myo", "LV"]
    assert list((out_dir / "tb").iterdir())  # TensorBoard events
    return ckpt


def test_supervised_learns(synth, tmp_path):
    cfg = tiny_cfg(
        synth, tmp_path / "sup", "supervised", max_iters=30, val_every=15, save_every=15, log_every=1
    )
    result = train(cfg)
    ckpt = _check_outputs(tmp_path / "sup", "supervised", 30)
    assert ckpt["teacher"] is None
    losses = [x[2] for x in result["train_loss"]]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learns something on the labeled slices
    assert result["best_dice"] >= 0.0


def test_mean_teacher_runs(synth, tmp_path):
    cfg = tiny_cfg(synth, tmp_path / "mt", "mean_teacher", mean_teacher={"consistency_start": 0})
    result = train(cfg)
    ckpt = _check_outputs(tmp_path / "mt", "mean_teacher", 4)
    assert ckpt["teacher"] is not None
    assert all(np.isfinite(x[2]) for x in result["train_loss"])


def test_bcp_pretrain_then_self_train(synth, tmp_path):
    cfg = tiny_cfg(synth, tmp_path / "bcp", "bcp", final_eval=True)
    result = train(cfg)
    ckpt = _check_outputs(tmp_path / "bcp", "bcp", 6)  # 2 pre-training + 4 self-training steps
    assert (tmp_path / "bcp" / "best_pretrain.pt").is_file()
    assert ckpt["phase"] == "train" and ckpt["teacher"] is not None
    phases = [x[1] for x in result["train_loss"]]
    assert phases == ["pretrain"] * 2 + ["train"] * 4
    report = json.loads((tmp_path / "bcp" / "best_val_metrics.json").read_text())
    assert set(report["summary"]["mean"]) >= {"dice", "jaccard", "hd95", "asd"}


def test_resume_continues_exactly(synth, tmp_path, monkeypatch):
    kw = {"max_iters": 6, "save_every": 2, "val_every": 3}
    full = tiny_cfg(synth, tmp_path / "full", "bcp", **kw)
    train(full)
    ref = load_checkpoint(tmp_path / "full" / "latest.pt")

    cfg = tiny_cfg(synth, tmp_path / "cut", "bcp", **kw)
    original = Trainer._after_step

    def crash_at_5(self, phase, phase_step):
        original(self, phase, phase_step)
        if self.step == 4:  # the 5th step: latest.pt holds step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(Trainer, "_after_step", original)
    assert load_checkpoint(tmp_path / "cut" / "latest.pt")["step"] == 4

    result = train(cfg, resume=True)
    assert [x[0] for x in result["train_loss"]] == [5, 6, 7, 8]  # continued from step 4
    got = load_checkpoint(tmp_path / "cut" / "latest.pt")
    assert got["step"] == ref["step"] == 8
    for key, value in ref["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=0, msg=key)
    for key, value in ref["teacher"].items():
        torch.testing.assert_close(got["teacher"][key], value, rtol=0, atol=0, msg=key)


class NeverLink:
    """An assistant that is never there: results are always None."""

    def __init__(self):
        self.requests = []

    def submit(self, request):
        self.requests.append(request)
        return str(len(self.requests))

    def result(self, request_id, timeout):
        return None

    def stats(self):
        return {"submitted": len(self.requests)}

    def close(self):
        pass


class BackgroundLink(NeverLink):
    """Answers every request at once with an all-background label map and confident scores."""

    def result(self, request_id, timeout):
        req = self.requests[int(request_id) - 1]
        b, h, w = req.images.shape
        return PseudoLabelResult(labels=np.zeros((b, h, w), np.uint8), confidence=np.ones((b, 4), np.float32))


def test_bcp_vessa_falls_back_when_assistant_is_gone(synth, tmp_path):
    link = NeverLink()
    cfg = tiny_cfg(
        synth, tmp_path / "bv", "bcp_vessa", vessa={"prefetch": 2, "warmup_iters": 2, "timeout_s": 0.0}
    )
    result = train(cfg, link=link)
    _check_outputs(tmp_path / "bv", "bcp_vessa", 6)
    a = result["assistant"]
    assert a["fallbacks"] == 4 and a["answered"] == 0  # every self-training step fell back
    # requests ran ahead: 4 used + 2 in flight; canonical 256×256 slices, warm-up without probabilities
    assert len(link.requests) == 6
    assert all(r.images.shape == (2, 256, 256) for r in link.requests)
    assert [r.student_probs is None for r in link.requests] == [True, True, False, False, False, False]
    assert link.requests[2].student_probs.shape == (2, 4, 256, 256)
    assert len(load_checkpoint(tmp_path / "bv" / "latest.pt")["planned"]) == 2


def test_bcp_vessa_uses_answers(synth, tmp_path):
    cfg = tiny_cfg(
        synth,
        tmp_path / "bv2",
        "bcp_vessa",
        vessa={"prefetch": 1, "warmup_iters": 0, "fusion": {"mode": "assistant"}},
    )
    result = train(cfg, link=BackgroundLink())
    a = result["assistant"]
    assert a["answered"] == 4 and a["fallbacks"] == 0
    assert all(np.isfinite(x[2]) for x in result["train_loss"])
