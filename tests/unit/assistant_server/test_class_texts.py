"""Class texts come from the dataset or stay neutral: a dataset without descriptions gets its class names
alone (no cardiac words), a dataset.json or classes.json with descriptions gets those, the SSL4MIS
ACDC layout keeps the descriptions it defines, and the bank's text embeddings are those texts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from assistant_server.text_embedding import class_text
from shared.data import open_dataset
from shared.data.classes import CARDIAC_CLASSES

CARDIAC_WORDS = re.compile(r"\b(RV|LV|Myo)\b|ventric|myocard|cardiac|heart|lung|chest", re.IGNORECASE)


def _msd(src: Path, out: Path, **meta_update) -> Path:
    """An MSD dataset over the synthetic images with its own dataset.json: `labels` and whatever else is
    given; the synthetic dataset's own class descriptions are not carried over."""
    out.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).symlink_to(src / sub)
    meta = json.loads((src / "dataset.json").read_text())
    meta.pop("label_descriptions")
    meta.update(meta_update)
    (out / "dataset.json").write_text(json.dumps(meta))
    (out / "splits.json").write_text((src / "splits.json").read_text())
    return out


@pytest.mark.parametrize(
    "labels",
    [{"background": 0, "organ": 1}, {"0": "background", "1": "left atrium"}],
    ids=["nnunet-v2", "msd-left-atrium"],
)
def test_a_dataset_without_descriptions_gets_neutral_texts(labels, synth_dir, tmp_path):
    ds = open_dataset(_msd(synth_dir, tmp_path / "d", name="binary", labels=labels))
    names = [c.name for c in ds.classes]
    assert names[0] == "background" and len(names) == 2
    assert [c.description for c in ds.classes] == ["", ""]
    assert [class_text(c) for c in ds.classes] == names  # "background" is plain "background"
    assert not any(CARDIAC_WORDS.search(class_text(c)) for c in ds.classes)


def test_dataset_descriptions_from_dataset_json_or_classes_json(synth_dir, tmp_path):
    labels = {"background": 0, "left atrium": 1}
    ds = open_dataset(
        _msd(
            synth_dir,
            tmp_path / "a",
            labels=labels,
            label_descriptions={"left atrium": "the left atrial blood pool", "0": "anything else"},
        )
    )
    assert [class_text(c) for c in ds.classes] == [
        "background: anything else",
        "left atrium: the left atrial blood pool",
    ]
    # a classes.json beside the data, in the bank's own list form; a class it omits stays neutral
    root = _msd(synth_dir, tmp_path / "b", labels=labels)
    (root / "classes.json").write_text(
        json.dumps([{"index": 1, "name": "left atrium", "description": "thin-walled chamber"}])
    )
    ds = open_dataset(root)
    assert [class_text(c) for c in ds.classes] == ["background", "left atrium: thin-walled chamber"]
    # another dataset's descriptions (classes this one does not have) are refused, not matched by name
    root = _msd(
        synth_dir,
        tmp_path / "c",
        labels=labels,
        label_descriptions={c.name: c.description for c in CARDIAC_CLASSES},
    )
    with pytest.raises(ValueError, match="'RV'"):
        open_dataset(root)
    (root / "classes.json").write_text(json.dumps([{"index": 1, "name": "RV", "description": "x"}]))
    meta = json.loads((root / "dataset.json").read_text())
    meta.pop("label_descriptions")
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not 'RV'"):
        open_dataset(root)


def test_acdc_layout_and_the_synthetic_dataset_keep_their_own_descriptions(synth_dir, tmp_path):
    from shared.data.synth import write_ssl4mis_layout

    write_ssl4mis_layout(tmp_path / "h5", cases=3, val_cases=1)
    h5 = open_dataset(tmp_path / "h5")
    assert h5.classes == CARDIAC_CLASSES
    assert class_text(h5.classes[0]).startswith("background: everything that is not RV")
    # the synthetic generator writes its own structures' texts into its dataset.json
    assert [c.description for c in open_dataset(synth_dir).classes] == [
        c.description for c in CARDIAC_CLASSES
    ]


def test_bank_text_is_the_dataset_text_and_a_reworded_bank_is_flagged(synth_dir, tiny_bank, tmp_path):
    from assistant_server.assistant import Assistant
    from assistant_server.bank import TemplateBank
    from assistant_server.bank_builder import build_bank
    from assistant_server.text_embedding import embed_texts
    from assistant_server.training.stage1 import Stage1Settings, train_stage1

    neutral = _msd(synth_dir, tmp_path / "neutral")  # the same classes, no descriptions
    build_bank(neutral, 2, tmp_path / "bank", encoder="tiny", device="cpu", engine="torch")
    bank = TemplateBank(tmp_path / "bank")
    assert [c.description for c in bank.classes] == ["", "", "", ""]
    np.testing.assert_allclose(bank.text.numpy(), embed_texts(["background", "RV", "Myo", "LV"]), atol=1e-5)
    # a checkpoint trained on the described bank: the neutral bank fits it (same class table) but is
    # flagged, since its text tokens learned other texts; its own bank is not
    ckpt = train_stage1(
        Stage1Settings(bank=tiny_bank, out=tmp_path / "a.pt", steps=1, batch_size=1, encoder="tiny")
    )
    with pytest.warns(UserWarning, match=r"classes \['background', 'RV', 'Myo', 'LV'\] differ"):
        Assistant.from_files(ckpt, tmp_path / "bank", device="cpu", encoder="tiny", engine="torch")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Assistant.from_files(ckpt, tiny_bank, device="cpu", encoder="tiny", engine="torch")
