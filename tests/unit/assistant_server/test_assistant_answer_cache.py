"""The assistant's answer cache: templates-only answers are remembered per (slice, bank version, classes);
student-prompted ones never are; a bank edit and the size bound retire entries."""

from __future__ import annotations

import shutil

import numpy as np

from assistant_server.assistant import Assistant, SliceInput
from assistant_server.bank import TemplateBank


def _slices(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((96, 80), dtype=np.float32) for _ in range(n)]


def test_templates_only_answers_are_remembered_and_identical(tiny_bank):
    a = Assistant.from_files("random", tiny_bank, device="cpu", encoder="tiny")
    images = _slices(3, 0)
    first = a.predict([SliceInput(image=x) for x in images])
    decoder_s = a.stats()["decoder_s"]
    again = a.predict([SliceInput(image=x) for x in images])
    assert a.stats()["answer_hits"] == 3
    for f, g in zip(first, again):
        assert g.status == "ok" and np.array_equal(f.label, g.label)
        np.testing.assert_array_equal(f.confidence, g.confidence)
    # a caller changing what it got back does not change what the next caller gets
    again[0].label[:] = 99
    third = a.predict([SliceInput(image=images[0])])
    assert np.array_equal(third[0].label, first[0].label)
    # another class subset is another answer
    a.predict([SliceInput(image=images[0])], class_ids=[1])
    assert a.stats()["answer_hits"] == 4
    # student prompts always go through the decoder
    probs = np.full((4, 32, 32), 0.25, np.float32)
    hits = a.stats()["answer_hits"]
    a.predict([SliceInput(image=x, student_probs=probs) for x in images])
    a.predict([SliceInput(image=x, student_probs=probs) for x in images])
    assert a.stats()["answer_hits"] == hits
    assert a.stats()["decoder_s"] > decoder_s
    # probabilities are not cached: asking for them runs the decoder and returns them
    out = a.predict([SliceInput(image=images[1])], return_probs=True)
    assert out[0].probs is not None and a.stats()["answer_hits"] == hits


def test_bank_edit_and_bound_retire_answers(tiny_bank, tmp_path):
    bank_dir = shutil.copytree(tiny_bank, tmp_path / "bank")
    a = Assistant.from_files("random", bank_dir, device="cpu", encoder="tiny", answer_cache_entries=2)
    images = _slices(3, 1)
    a.predict([SliceInput(image=x) for x in images])  # three answers, room for two: the first goes
    a.predict([SliceInput(image=images[2])])
    assert a.stats()["answer_hits"] == 1
    a.predict([SliceInput(image=images[0])])
    assert a.stats()["answer_hits"] == 1
    bank = TemplateBank(bank_dir)
    bank.remove([bank.exemplars[0].id])  # new bank version: the old answers no longer apply
    a.predict([SliceInput(image=images[2])])
    assert a.stats()["answer_hits"] == 1
    off = Assistant.from_files("random", bank_dir, device="cpu", encoder="tiny", answer_cache_entries=0)
    off.predict([SliceInput(image=images[0])])
    off.predict([SliceInput(image=images[0])])
    assert off.stats()["answer_hits"] == 0
