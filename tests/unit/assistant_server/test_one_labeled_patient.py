"""One labeled patient: Stage-1 episodes draw query and templates from the same patient (its other cases
first, then far slices of its own case, never the query slice or its neighbours), and the recipe with
`labeled=1` trains, saves and labels. With two or more patients the cross-patient rule is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from assistant_server.bank import TemplateBank
from assistant_server.training.stage1 import (
    SAME_PATIENT_WINDOW,
    _candidates,
    sample_episodes,
    template_exclusion,
)
from tests.helpers import ROOT


def _old_cross_patient_candidates(descriptors, patients, k):
    """The rule before one-patient banks existed, verbatim: the 2k nearest exemplars of other patients."""
    sim = descriptors @ descriptors.T
    same = torch.tensor([[p == q for q in patients] for p in patients], dtype=torch.bool)
    sim = sim.masked_fill(same, -2.0)
    kk = min(2 * k, int((~same).sum(1).min().item()))
    return sim.topk(kk, dim=1).indices


def _descriptors(n, seed=0):
    return torch.nn.functional.normalize(
        torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)), dim=1
    )


def test_two_or_more_patients_keep_the_cross_patient_rule():
    patients = ["a"] * 5 + ["b"] * 4 + ["c"] * 6
    cases = ["a1"] * 3 + ["a2"] * 2 + ["b1"] * 4 + ["c1"] * 6
    slices = [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    d = _descriptors(len(patients))
    for k in (1, 2, 4):
        got = _candidates(d, patients, cases, slices, k)
        assert torch.equal(got, _old_cross_patient_candidates(d, patients, k))
        for q, row in enumerate(got.tolist()):
            assert all(patients[t] != patients[q] for t in row)
    excluded, preferred = template_exclusion(patients, cases, slices)
    assert not preferred.any()
    # two patients, one exemplar each: each is the other's only template
    assert _candidates(_descriptors(2), ["a", "b"], ["a", "b"], [0, 0], 4).tolist() == [[1], [0]]


def test_one_patient_excludes_the_query_slice_and_its_neighbours_and_prefers_other_cases():
    # one patient, two cases (e.g. two labeled frames) of 6 and 5 slices
    cases = ["f1"] * 6 + ["f2"] * 5
    slices = list(range(6)) + list(range(5))
    patients = ["p"] * len(cases)
    d = _descriptors(len(cases), seed=1)
    # every other-case exemplar is preferred over any own-case one, whatever the similarities
    got = _candidates(d, patients, cases, slices, k=3)  # 2k = 6 candidates
    for q, row in enumerate(got.tolist()):
        own = [t for t in row if cases[t] == cases[q]]
        other = [t for t in row if cases[t] != cases[q]]
        assert all(abs(slices[t] - slices[q]) > SAME_PATIENT_WINDOW for t in own)
        n_other = cases.count("f2" if cases[q] == "f1" else "f1")
        assert len(other) == n_other  # all of the other case first (5 or 6 ≤ 6 candidates)
        assert all(cases[t] != cases[q] for t in row[:n_other])  # and they come first
    # one patient, one case: templates are the case's own slices at least two away
    one = _candidates(_descriptors(8, seed=2), ["p"] * 8, ["c"] * 8, list(range(8)), k=4)
    assert one.shape == (8, 5)  # a middle slice keeps 8 - 3 exemplars
    for q, row in enumerate(one.tolist()):
        assert all(abs(t - q) >= 2 for t in row)
    # a case too short to leave any template for its middle slice
    with pytest.raises(ValueError, match="template it may use"):
        _candidates(_descriptors(3), ["p"] * 3, ["c"] * 3, [0, 1, 2], k=2)


def _one_patient_two_cases(src: Path, out: Path) -> Path:
    """The synthetic dataset with its first two training cases mapped to one patient (dataset.json's
    "patients"): that patient has two labeled cases, like an ACDC patient's two labeled frames."""
    out.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).symlink_to(src / sub)
    meta = json.loads((src / "dataset.json").read_text())
    splits = json.loads((src / "splits.json").read_text())
    first, second = splits["train"][:2]
    meta["patients"] = {first: "patientA", second: "patientA"}
    (out / "dataset.json").write_text(json.dumps(meta))
    (out / "splits.json").write_text(json.dumps(splits))
    return out


@pytest.fixture(scope="module")
def one_patient_data(synth_dir, tmp_path_factory) -> Path:
    return _one_patient_two_cases(synth_dir, tmp_path_factory.mktemp("onepatient") / "data")


@pytest.mark.parametrize("two_cases", [True, False], ids=["two-cases", "one-case"])
def test_no_episode_uses_the_query_slice_or_its_neighbours(two_cases, one_patient_data, synth_dir, tmp_path):
    from assistant_server.bank_builder import build_bank

    data = one_patient_data if two_cases else synth_dir
    build_bank(data, 1, tmp_path / "bank", encoder="tiny", device="cpu")
    bank = TemplateBank(tmp_path / "bank")
    ex = bank.exemplars
    assert len({e.patient_id for e in ex}) == 1 and len({e.case_id for e in ex}) == (2 if two_cases else 1)
    cands = _candidates(
        bank.tensors()["descriptor"].float(),
        bank.patient_ids(),
        [e.case_id for e in ex],
        [e.slice_index for e in ex],
        4,
    )
    pool = torch.arange(len(ex))
    seen = 0
    for step in range(200):
        g = torch.Generator().manual_seed(step)
        qi, ti, _ = sample_episodes(pool, cands, 8, 4, g)
        assert ti.shape == (8, 4)
        for q, ts in zip(qi.tolist(), ti.tolist()):
            for t in ts:
                assert t != q
                if ex[t].case_id == ex[q].case_id:
                    assert abs(ex[t].slice_index - ex[q].slice_index) > SAME_PATIENT_WINDOW
                    assert not two_cases  # the other case (≥ 8 slices ≥ 2k) fills every candidate list
                seen += 1
    assert seen == 200 * 8 * 4


def test_recipe_with_one_labeled_patient_trains_saves_and_labels(one_patient_data, tmp_path):
    from assistant_server.assistant import Assistant, SliceInput
    from assistant_server.checkpoint import read_checkpoint
    from assistant_server.training.recipe import RecipeSettings, run_recipe
    from shared.config import load_settings
    from shared.data import open_dataset

    config = tmp_path / "recipe.yaml"
    config.write_text((ROOT / "configs/assistant/acdc_3_cpu.yaml").read_text())
    s = load_settings(
        RecipeSettings, config, data=one_patient_data, labeled=1, out=tmp_path / "rec", encoder="tiny"
    )
    s = s.model_copy(
        update={"train": {**s.train, "steps": 3, "batch_size": 2, "augment_views": 0, "engine": "torch"}}
    )
    ckpt = run_recipe(s)
    assert ckpt.is_file() and read_checkpoint(ckpt)["step"] == 3
    bank = TemplateBank(tmp_path / "rec" / "bank")
    assert set(bank.patient_ids()) == {"patientA"}

    ds = open_dataset(one_patient_data)
    case = ds.volume_ids("val")[0]
    image = ds.read_volume(case, "val", with_label=False).image
    a = Assistant.from_files(ckpt, tmp_path / "rec" / "bank", device="cpu", encoder="tiny", engine="torch")
    outs = a.predict_volume([SliceInput(image=im) for im in image[:3]])
    assert [o.status for o in outs] == ["ok"] * 3
    for o, im in zip(outs, image[:3]):
        assert o.label.shape == im.shape and o.label.dtype == np.uint8
        assert set(np.unique(o.label)) <= set(range(len(bank.classes)))
        assert o.confidence.shape == (len(bank.classes),)
