"""Self-training: the pseudo-labeled bank (assistant_server/training/pseudo_bank.py) and Stage-1's use of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from assistant_server.assistant import SliceOutput
from assistant_server.bank import TemplateBank
from assistant_server.training.pseudo_bank import (
    PSEUDO_SOURCE,
    PseudoBankSettings,
    build_pseudo_bank,
    pick_patients,
    select_confident,
    slice_confidence,
)
from assistant_server.training.stage1 import Stage1Settings, train_stage1
from tests.helpers import copy_bank


def test_pick_patients_spreads_over_the_order():
    ps = [f"p{i:02d}" for i in range(10)]
    assert pick_patients(ps, 5) == ["p00", "p02", "p04", "p06", "p08"]
    assert pick_patients(ps, 3) == ["p00", "p03", "p06"]
    assert pick_patients(ps, 20) == ps


def test_slice_confidence_and_selection():
    label = np.zeros((4, 4), np.uint8)
    label[0, 0], label[1, 1] = 1, 3
    conf = np.array([np.nan, 0.8, 0.1, 0.4], np.float32)  # class 2 is not shown: it does not count
    assert slice_confidence(SliceOutput("ok", "h", label, conf)) == pytest.approx(0.6)
    assert math.isnan(slice_confidence(SliceOutput("ok", "h", np.zeros((4, 4), np.uint8), conf)))
    assert math.isnan(slice_confidence(SliceOutput("miss", "h")))
    c = [0.2, float("nan"), 0.9, 0.5, 0.7]
    assert select_confident(c, 0.5) == [2, 4]  # half of the 4 finite ones, most confident first
    assert select_confident(c, 0.01) == [2]  # at least one
    assert select_confident([float("nan")] * 3, 0.5) == []


@pytest.fixture(scope="module")
def teacher(tiny_bank, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "assistant.pt"
    return train_stage1(Stage1Settings(bank=tiny_bank, out=out, steps=2, batch_size=1, encoder="tiny"))


@pytest.fixture(scope="module")
def pseudo(teacher, synth_dir, tmp_path_factory):
    """A pseudo-labeled bank built while every label-reading path of the dataset fails if called."""
    from shared.data import open_dataset

    ds_cls = type(open_dataset(synth_dir))

    def refuse(*_a, **_k):
        raise AssertionError("the pseudo-bank builder read a label")

    out = tmp_path_factory.mktemp("pseudo") / "bank"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds_cls, "read_labeled", refuse)
        mp.setattr(ds_cls, "read_volume", refuse)
        build_pseudo_bank(
            PseudoBankSettings(
                ckpt=teacher,
                data=synth_dir,
                labeled=3,
                out=out,
                patients=2,
                keep=0.5,
                holdout_patients=2,
                device="cpu",
            )
        )
    return out


def test_pseudo_bank_labels_unlabeled_volumes_without_reading_their_labels(pseudo, tiny_bank, synth_dir):
    from shared.data import open_dataset
    from shared.data.split import split_by_patient

    split = split_by_patient(open_dataset(synth_dir), 3)
    pb = TemplateBank(pseudo)
    assert len(pb) > 0
    patients = set(pb.patient_ids())
    assert patients <= set(split.unlabeled_patients[:-2]) and len(patients) <= 2  # the holdout stays unseen
    assert not patients & set(TemplateBank(tiny_bank).patient_ids())
    assert {e.source for e in pb.exemplars} == {PSEUDO_SOURCE}
    t = pb.tensors()
    assert t["embedding"].shape == (len(pb), 256, 64, 64) and t["label"].shape == (len(pb), 256, 256)
    assert int(t["label"].max()) < len(pb.classes) and (t["label"].flatten(1) > 0).any(1).all()
    assert (pseudo / "pseudo_labels.json").is_file() and (pseudo / "pseudo_bank.resolved.yaml").is_file()


def test_stage1_self_training_draws_pseudo_queries(pseudo, tiny_bank, tmp_path):
    out = tmp_path / "st" / "assistant.pt"
    s = Stage1Settings(
        bank=tiny_bank, out=out, steps=2, batch_size=2, encoder="tiny", pseudo_bank=pseudo, p_pseudo=1.0
    )
    path = train_stage1(s)
    from assistant_server.checkpoint import load_checkpoint

    payload = load_checkpoint(path)[1]
    assert (
        payload["train_config"]["pseudo_bank"] == str(pseudo) and payload["train_config"]["p_pseudo"] == 1.0
    )
    # a "pseudo" bank that holds a labeled patient is refused: its labels would be real ones
    wrong = copy_bank(tiny_bank, tmp_path / "wrong")
    with pytest.raises(ValueError, match="labeled patients"):
        train_stage1(s.model_copy(update={"pseudo_bank": wrong, "out": tmp_path / "w" / "a.pt"}))


def test_pseudo_steps_do_not_train_the_iou_head():
    from assistant_server.training.stage1 import _loss

    logits = torch.randn(2, 3, 8, 8)
    iou = torch.rand(2, 3)
    labels = torch.randint(0, 4, (2, 8, 8))
    s = Stage1Settings(bank="b", out="o", encoder="tiny", iou_weight=5.0)
    with_iou = _loss(logits, iou, labels, s)
    without = _loss(logits, iou, labels, s, train_iou=False)
    assert torch.allclose(with_iou["loss"] - without["loss"], 5.0 * with_iou["iou_mse"])


@pytest.mark.slow
def test_recipe_self_training_round_on_a_binary_dataset(synth_dir, tmp_path):
    from assistant_server.checkpoint import read_checkpoint
    from assistant_server.training.recipe import RecipeSettings, run_recipe
    from tests.unit.assistant_server.test_assistant_recipe import _binary_dataset

    data = _binary_dataset(synth_dir, tmp_path / "binary")
    s = RecipeSettings(
        data=data,
        labeled=2,
        out=tmp_path / "rec",
        encoder="tiny",
        device="cpu",
        train={"steps": 2, "batch_size": 2},
        self_train={"patients": 2, "keep": 0.5, "holdout_patients": 1, "p_pseudo": 0.5},
    )
    ckpt = run_recipe(s)
    rec = tmp_path / "rec"
    assert ckpt == rec / "assistant.pt" and (rec / "teacher.pt").is_file()
    pseudo = TemplateBank(rec / "pseudo_bank")
    assert len(pseudo) > 0 and not set(pseudo.patient_ids()) & set(TemplateBank(rec / "bank").patient_ids())
    cfg = read_checkpoint(ckpt)["train_config"]
    assert cfg["p_pseudo"] == 0.5 and cfg["pseudo_bank"] == str(rec / "pseudo_bank")
    assert read_checkpoint(rec / "teacher.pt")["train_config"]["pseudo_bank"] is None
    # a rerun reuses the teacher and its pseudo-labeled bank
    assert run_recipe(s) == ckpt
    with pytest.raises(ValueError, match="p_pseudo"):
        run_recipe(s.model_copy(update={"train": {"steps": 2, "p_pseudo": 0.3}}))
