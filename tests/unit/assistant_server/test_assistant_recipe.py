"""The Stage-1 recipe and its levers: augmented views cached by content, self-prompting, volume refinement,
component cleaning read off the bank, confidence ranking statistics, and the one-command recipe on a
binary-class dataset with other sizes (the recipe must not know ACDC)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from assistant_server.assistant.options import InferenceOptions
from assistant_server.training.augmented_views import augmented_view, build_views, view_geometry, view_key
from shared.calibration import reliability_table, spearman
from shared.components import keep_largest, single_component_classes
from tests.helpers import ROOT

# ---------------------------------------------------------------------------------------------- ranking


def test_spearman_known_answers():
    x = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert spearman(x, [1, 2, 3, 4, 5]) == pytest.approx(1.0)
    assert spearman(x, [50, 40, 30, 20, 10]) == pytest.approx(-1.0)
    # one swapped pair among five: rho = 1 - 6*2/(5*24) = 0.9
    assert spearman(x, [1, 2, 4, 3, 5]) == pytest.approx(0.9)
    assert math.isnan(spearman([0.5, 0.5, 0.5], [1, 2, 3]))  # a constant confidence ranks nothing
    assert spearman([0.1, float("nan"), 0.3, 0.4], [1, 9, 3, 4]) == pytest.approx(1.0)  # NaN pairs dropped
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_reliability_table_equal_count_bins():
    conf = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.6]
    dice = [90, 10, 50, 30, 70, 20, 80, 60]
    rows = reliability_table(conf, dice, bins=4)
    assert [r["count"] for r in rows] == [2, 2, 2, 2]
    assert [r["mean_quality"] for r in rows] == pytest.approx([15, 40, 65, 85])
    assert rows[0]["conf_lo"] == pytest.approx(0.1) and rows[-1]["conf_hi"] == pytest.approx(0.9)
    assert len(reliability_table([0.5], [1.0], bins=4)) == 1


# ---------------------------------------------------------------------------------------------- components


def test_single_component_classes_and_keep_largest():
    labels = np.zeros((4, 32, 32), np.uint8)
    for i in range(4):
        labels[i, 4:12, 4:12] = 1  # class 1: one blob in every exemplar
        labels[i, 20:24, 2:6] = 2  # class 2: two blobs of equal size
        labels[i, 20:24, 20:24] = 2
    assert single_component_classes(torch.from_numpy(labels), [1, 2]) == [1]

    pred = np.zeros((3, 16, 16), np.uint8)
    pred[0:2, 2:8, 2:8] = 1  # a blob across two slices
    pred[2, 12:14, 12:14] = 1  # a stray blob in the last slice, not touching it
    pred[2, 0:2, 0:2] = 2
    out = keep_largest(pred, [1])
    assert out[2, 12:14, 12:14].sum() == 0 and out[0:2, 2:8, 2:8].all()
    assert (out == 2).sum() == 4  # classes not asked for are untouched
    # 2D: per slice, the largest piece of the slice stays
    assert keep_largest(pred[2], [1])[12:14, 12:14].all()
    # keep_share: a second piece at least that share of the largest stays, a smaller one goes
    two = np.zeros((1, 16, 16), np.uint8)
    two[0, 0:4, 0:4] = 1  # 16 px, the largest
    two[0, 8:11, 8:11] = 1  # 9 px: 56 % of it
    two[0, 14:15, 14:16] = 1  # 2 px: 12 %
    kept = keep_largest(two, [1], keep_share=0.5)
    assert kept[0, 8:11, 8:11].all() and kept[0, 0:4, 0:4].all() and kept[0, 14, 14:16].sum() == 0
    assert keep_largest(two, [1], keep_share=1.0)[0, 8:11, 8:11].sum() == 0


def test_inference_options_validate_and_round_trip():
    opts = InferenceOptions(
        refine_passes=2, volume_context=0.25, largest_component="auto", num_templates=6, position_weight=0.2
    )
    assert InferenceOptions.from_dict({**opts.to_dict(), "future_key": 1}) == opts
    assert opts.replace(refine_passes=None, volume_context=0.0).volume_context == 0.0
    for bad in (
        {"refine_passes": 9},
        {"volume_context": 0.5},
        {"largest_component": "yes"},
        {"num_templates": 0},
        {"position_weight": -1},
        {"component_keep_share": 0.0},
        {"component_keep_share": 1.5},
        {"volume_templates": -1},
    ):
        with pytest.raises(ValueError):
            InferenceOptions(**bad)


# ---------------------------------------------------------------------------------------------- augmented views


def test_augmented_views_transform_image_and_label_alike():
    img = torch.zeros(2, 256, 256)
    img[:, 40:100, 150:220] = 1.0
    lab = (img > 0.5).to(torch.uint8)
    assert view_geometry(0) == view_geometry(0, seed=5)  # view 0 is the bank itself
    same_img, same_lab = augmented_view(img, lab, 0)
    assert torch.equal(same_img, img) and torch.equal(same_lab, lab)
    for v in (1, 2, 3):
        a_img, a_lab = augmented_view(img, lab, v)
        assert a_img.shape == img.shape and a_lab.dtype == lab.dtype
        # the label still covers the (intensity-changed) bright square, wherever the geometry put it
        inside = a_img[a_lab.bool()]
        assert inside.numel() > 0 and inside.mean() > 0.6 > a_img[~a_lab.bool()].mean()
    assert view_geometry(1) != view_geometry(2)
    assert augmented_view(img, lab, 1)[0].equal(augmented_view(img, lab, 1)[0])  # deterministic


def test_augmented_view_cache_keyed_by_content_and_reused(tiny_bank, tmp_path):
    from assistant_server.bank import TemplateBank
    from assistant_server.checkpoint import build_model
    from assistant_server.modeling.vessa import VessaConfig

    t = TemplateBank(tiny_bank).tensors()
    images, labels = t["image"][:3].float(), t["label"][:3]
    model = build_model(VessaConfig(encoder="tiny"), pretrained=False).eval()
    store = tmp_path / "views"
    emb, lab, counts = build_views(model, images, labels, 2, store, torch.device("cpu"))
    assert emb.shape == (2, 3, 256, 64, 64) and lab.shape == (2, 3, 256, 256)
    assert counts == {"encoded": 6, "reused": 0}
    keys = {view_key(augmented_view(images, labels, v)[0][i]) for v in (1, 2) for i in range(3)}
    assert {p.stem for p in store.glob("*.safetensors")} == keys  # one file per augmented image's content
    emb2, _, counts2 = build_views(model, images, labels, 2, store, torch.device("cpu"))
    assert counts2 == {"encoded": 0, "reused": 6}
    assert torch.equal(emb, emb2)
    # a changed image is new content: encoded again, the others reused
    images[0] += 0.01
    _, _, counts3 = build_views(model, images, labels, 2, store, torch.device("cpu"))
    assert counts3 == {"encoded": 2, "reused": 4}


# ---------------------------------------------------------------------------------------------- prompt paths


@pytest.fixture(scope="module")
def tiny_assistant(tiny_bank):
    from assistant_server.assistant import Assistant

    return Assistant.from_files("random", tiny_bank, device="cpu", encoder="tiny")


def _volume(synth_dir):
    from shared.data import open_dataset

    ds = open_dataset(synth_dir)
    vol = ds.read_volume(ds.volume_ids("val")[0], "val")
    return vol.image[:4]


def test_refinement_and_volume_paths_shapes(tiny_assistant, synth_dir):
    from assistant_server.assistant import SliceInput

    a = tiny_assistant
    image = _volume(synth_dir)[:2]  # every pass runs SAM's full decoder: two slices keep it to seconds
    slices = [SliceInput(image=image[z]) for z in range(len(image))]
    c = len(a.classes)
    a.options = InferenceOptions(
        refine_passes=1, volume_context=0.25, largest_component="on", num_templates=2, position_weight=0.3
    )
    a.num_templates = 2
    a._answers.clear()
    try:
        outs = a.predict(slices, return_probs=True)
        vol = a.predict_volume(slices, return_probs=True)
        for o in outs + vol:
            assert o.status == "ok" and o.label.shape == image.shape[1:] and o.label.dtype == np.uint8
            assert o.confidence.shape == (c,) and o.probs.shape == (c, *image.shape[1:])
        for o in outs:  # "on": at most one 2D component per class in a lone slice
            assert np.array_equal(keep_largest(o.label, list(range(1, c))), o.label)
        labels3d = np.stack([o.label for o in vol])  # and in 3D for a volume
        assert np.array_equal(keep_largest(labels3d, list(range(1, c))), labels3d)
        sub = a.predict_volume(slices, class_ids=[2])
        assert set(np.unique(np.stack([o.label for o in sub]))) <= {0, 2}
        assert np.isnan(sub[0].confidence[1]) and np.isfinite(sub[0].confidence[2])
        assert a._as_prompt(torch.rand(3, 3, 256, 256), [1, 3]).shape == (3, c, 256, 256)
    finally:
        a.options = InferenceOptions()
        a.num_templates = a.model.config.num_templates


def test_volume_with_unknown_hash_is_a_miss(tiny_assistant, synth_dir):
    from assistant_server.assistant import SliceInput

    image = _volume(synth_dir)
    slices = [SliceInput(image=image[0]), SliceInput(slice_hash="0" * 32)]
    outs = tiny_assistant.predict_volume(slices)
    assert [o.status for o in outs] == ["ok", "miss"]


# ---------------------------------------------------------------------------------------------- the recipe


def _binary_dataset(src: Path, out: Path) -> Path:
    """A binary-class MSD dataset with other in-plane sizes and depths, made from the synthetic one: one
    structure ("organ", the synthetic LV + myocardium) cropped to 96×80."""
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for img_path in sorted((src / "imagesTr").glob("*.nii.gz")):
        case = img_path.name.replace("_0000.nii.gz", "")
        img = nib.load(img_path)
        lab = nib.load(src / "labelsTr" / f"{case}.nii.gz")
        x = np.asarray(img.dataobj)[8:104, 16:96, 1:-1]
        y = (np.isin(np.asarray(lab.dataobj), [2, 3]).astype(np.uint8))[8:104, 16:96, 1:-1]
        nib.save(nib.Nifti1Image(x.astype(np.int16), img.affine), out / "imagesTr" / img_path.name)
        nib.save(nib.Nifti1Image(y, lab.affine), out / "labelsTr" / f"{case}.nii.gz")
    meta = json.loads((src / "dataset.json").read_text())
    meta.update(name="binary-organ", labels={"background": 0, "organ": 1})
    meta.pop("label_descriptions")  # the cardiac texts are the synthetic dataset's, not this one's
    (out / "dataset.json").write_text(json.dumps(meta))
    (out / "splits.json").write_text((src / "splits.json").read_text())
    return out


@pytest.mark.slow
def test_recipe_runs_unchanged_on_a_binary_dataset(synth_dir, tmp_path):
    from assistant_server.checkpoint import read_checkpoint
    from assistant_server.training.evaluate import EvalSettings, evaluate_assistant
    from assistant_server.training.recipe import RecipeSettings, run_recipe
    from shared.config import load_settings

    data = _binary_dataset(synth_dir, tmp_path / "binary")
    config = tmp_path / "recipe.yaml"
    config.write_text(
        (ROOT / "configs/assistant/acdc_3_cpu.yaml").read_text()
    )
    s = load_settings(RecipeSettings, config, data=data, labeled=2, out=tmp_path / "rec", encoder="tiny")
    s = s.model_copy(update={"train": {**s.train, "steps": 3, "batch_size": 2, "augment_views": 1}})
    ckpt = run_recipe(s)
    payload = read_checkpoint(ckpt)
    assert [c["name"] for c in payload["classes"]] == ["background", "organ"]
    stored = payload["extra"]["inference"]
    assert stored == InferenceOptions.from_dict(s.train.get("inference")).to_dict()
    assert (tmp_path / "rec" / "recipe.resolved.yaml").is_file()
    assert len(list((tmp_path / "rec" / "bank" / "augmented").glob("*.safetensors"))) > 0
    report = evaluate_assistant(
        EvalSettings(ckpt=str(ckpt), data=data, split="val", limit=2, modes=("templates", "template_copy"))
    )
    assert report["inference_options"] == stored  # what a replica would serve
    assert set(report["summary"]) == {"templates", "template_copy"}
    assert "organ" in report["per_volume"]["templates"][0]["classes"]
    assert set(report["ranking"]["templates"]) == {"spearman", "spearman_per_class", "reliability"}
    # a rerun reuses the bank and resumes (nothing left to train)
    assert run_recipe(s) == ckpt


def test_position_aware_retrieval(tiny_assistant):
    a = tiny_assistant
    st = a.bank_state()
    assert st.positions.shape == (len(a.bank),) and 0 <= float(st.positions.min()) <= float(st.positions.max()) <= 1
    desc = st.descriptors.mean(0, keepdim=True).repeat(2, 1)
    try:
        a.options = InferenceOptions(position_weight=2.0)
        idx = a._retrieve(desc, st, torch.tensor([0.0, 1.0]))
        assert float(st.positions[idx[0]].mean()) < 0.3 and float(st.positions[idx[1]].mean()) > 0.7
        a.options = InferenceOptions()
        plain = a._retrieve(desc, st, torch.tensor([0.0, 1.0]))
        assert torch.equal(plain[0], plain[1])  # without the weight the position is ignored
    finally:
        a.options = InferenceOptions()


def test_volume_templates_join_the_bank_and_a_slice_never_retrieves_itself(tiny_assistant, synth_dir):
    from assistant_server.assistant import SliceInput

    a = tiny_assistant
    st = a.bank_state()
    z, n, m = 3, len(st.keys), len(a.classes) - 1
    emb = torch.stack(a.embeddings([SliceInput(image=im) for im in _volume(synth_dir)[:z]])[1])
    probs = torch.zeros(z, 1 + m, 256, 256)
    probs[:, 0] = 1.0
    probs[1:, 0, 100:140, 100:140], probs[1:, m, 100:140, 100:140] = 0.0, 1.0  # slice 0: background only
    conf = torch.tensor([[0.9] * m, [0.8] * m, [0.5] * m])
    try:
        a.options = InferenceOptions(volume_templates=5)  # more than the 2 slices with foreground
        extra, exclude = a._with_volume_templates(st, emb, probs, conf, torch.tensor([0.0, 0.5, 1.0]), list(range(1, m + 1)))
        assert extra.keys.shape[0] == n + 2 and extra.label_grid.shape[0] == n + 2 and extra.positions.shape == (n + 2,)
        assert exclude.shape == (z, n + 2) and int(exclude.sum()) == 2
        assert exclude[1, n] and exclude[2, n + 1]  # slice 1 (more confident) first, then slice 2
        assert torch.allclose(extra.label_grid[n + 1], a.model.matcher.label_grid(
            torch.nn.functional.one_hot(probs[2].argmax(0), m + 1).permute(2, 0, 1)[None].float())[0])
        # a query identical to slice 1 would retrieve itself first; excluded, it never does
        desc = extra.descriptors[n + 0 : n + 1].clone()
        a.num_templates = 2
        assert n in a._retrieve(desc, extra, None, None)[0].tolist()
        assert n not in a._retrieve(desc, extra, None, exclude[1:2])[0].tolist()
        image = _volume(synth_dir)[:2]
        for passes in (0, 1):
            a.options = InferenceOptions(volume_templates=2, refine_passes=passes)
            a._answers.clear()
            vol = a.predict_volume([SliceInput(image=image[k]) for k in range(2)], return_probs=True)
            assert all(o.status == "ok" and o.label.shape == image.shape[1:] for o in vol)
    finally:
        a.options = InferenceOptions()
        a.num_templates = a.model.config.num_templates


@pytest.mark.parametrize(
    "config", sorted((ROOT / "configs/assistant").rglob("*.yaml")), ids=str
)
def test_every_shipped_recipe_resolves_and_takes_seed_and_steps_flags(config):
    """Each shipped recipe and ablation validates as a whole (Stage-1 keys included) and `--seed` /
    `--steps` reach its Stage-1 section: the ablation tables' seed runs are these commands."""
    import yaml
    from typer.testing import CliRunner

    from assistant_server.training.recipe import RecipeSettings
    from assistant_server.training.stage1 import Stage1Settings
    from services.cli.main import app

    res = CliRunner().invoke(
        app, ["assistant", "recipe", "--config", str(config), "--seed", "7", "--steps", "11", "--show-config"]
    )
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load(res.stdout)
    assert resolved["train"]["seed"] == 7 and resolved["train"]["steps"] == 11
    RecipeSettings.model_validate(resolved)
    Stage1Settings(bank="bank", out="assistant.pt", **resolved["train"])  # unknown keys are refused
    InferenceOptions.from_dict(resolved["train"].get("inference", {}))
