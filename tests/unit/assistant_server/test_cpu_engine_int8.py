"""The int8 encoder (assistant_server/engines/openvino_int8.py): NNCF quantizes the converted fp32 IR on the
bank's exemplars, once per (weights, calibration set); its embeddings stay close to PyTorch's; without
calibration images or without NNCF it serves OpenVINO f32 after one warning.

All on the tiny encoder (seconds). Whether int8 keeps LiteMedSAM's labels is measured, not asserted here:
benchmarks/cpu_engine.py, docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from assistant_server.assistant import Assistant, SliceInput
from assistant_server.checkpoint import build_model
from assistant_server.engines import select_encoder
from assistant_server.engines.openvino_runtime import float_hint, resolve_precision
from assistant_server.modeling.vessa import VessaConfig

pytest.importorskip("openvino")
pytest.importorskip("nncf")  # the dev and cpu extras bring it

from assistant_server.engines import openvino_encoder as ov_encoder  # noqa: E402
from assistant_server.engines import openvino_int8  # noqa: E402
from assistant_server.engines.openvino_encoder import OpenVINOEncoder  # noqa: E402
from assistant_server.engines.openvino_int8 import calibration_inputs  # noqa: E402

# int8 against fp32 PyTorch on the random-weight tiny encoder: relative L2 error of the embeddings
# (measured 0.02-0.05; a wrong scale, a wrong input layout or unquantized garbage gives ~1)
INT8_REL_L2 = 0.15
# label maps of the random-weight tiny model (near-tied classes): most pixels agree with the f32 engine's
MIN_EQUAL_PIXELS_INT8 = 0.9


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture
def engine_cache(_module_cache, monkeypatch) -> Path:
    """One private converted-model cache for this module (never the user's): the tiny encoder's fp32
    entry is converted once for all tests; tests that count quantizations use weights of their own."""
    monkeypatch.setenv("VESSA_ENGINE_CACHE", str(_module_cache))
    return _module_cache


def _tiny(seed: int = 0):
    return build_model(VessaConfig(encoder="tiny"), pretrained=False, seed=seed).eval()


def _images(n: int, seed: int) -> np.ndarray:
    """Slice-like calibration images: smooth blobs on a dark background, not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out.append((blob + 0.05 * rng.random((96, 96))).astype(np.float32))
    return np.stack(out)


def _engine_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("assistant_server.engines") and r.levelno == logging.WARNING]


def test_calibration_inputs_are_a_seeded_choice_of_encoder_inputs():
    imgs = _images(40, seed=1)
    a = calibration_inputs(torch.from_numpy(imgs).half(), limit=8)
    b = calibration_inputs(torch.from_numpy(imgs).half(), limit=8)
    assert a.shape == (8, 3, 256, 256) and a.dtype == np.float32 and np.array_equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert calibration_inputs(imgs[:3], limit=8).shape[0] == 3  # fewer than the limit: all of them
    with pytest.raises(ValueError, match="calibration needs exemplar images"):
        calibration_inputs(np.zeros((0, 64, 64), np.float32))


def test_int8_embeddings_stay_close_to_pytorch(engine_cache):
    model = _tiny()
    calib = calibration_inputs(_images(12, seed=2))
    enc = OpenVINOEncoder(model.image_encoder, batch=4, precision="int8", calibration=calib)
    assert enc.name == "openvino-int8"
    x = torch.from_numpy(calibration_inputs(_images(6, seed=3)))  # unseen slices; two chunks, one padded
    with torch.inference_mode():
        ref = model.encode(x)
    got = enc(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < INT8_REL_L2, rel
    # the graph really is quantized: the int8 IR has FakeQuantize nodes the fp32 one lacks
    xml = (enc.entry / ov_encoder.XML).read_text()
    assert "FakeQuantize" in xml


def test_int8_entry_is_keyed_by_weights_and_calibration_and_reused(engine_cache):
    calib = calibration_inputs(_images(8, seed=4))
    q0, c0 = openvino_int8.QUANTIZATIONS, ov_encoder.CONVERSIONS
    first = OpenVINOEncoder(_tiny(7).image_encoder, batch=4, precision="int8", calibration=calib)
    assert first.converted and openvino_int8.QUANTIZATIONS - q0 == 1 and ov_encoder.CONVERSIONS - c0 == 1
    again = OpenVINOEncoder(_tiny(7).image_encoder, batch=4, precision="int8", calibration=calib)  # a restart
    assert not again.converted and again.entry == first.entry and openvino_int8.QUANTIZATIONS - q0 == 1
    x = torch.from_numpy(calib[:4])
    assert torch.equal(again(x), first(x))
    # the fp32 entry it was quantized from serves f32 without converting again
    f32 = OpenVINOEncoder(_tiny(7).image_encoder, batch=4, precision="f32")
    assert not f32.converted and f32.entry != first.entry and ov_encoder.CONVERSIONS - c0 == 1
    # another calibration set, or other weights: quantized anew
    other_calib = OpenVINOEncoder(_tiny(7).image_encoder, batch=4, precision="int8", calibration=calib[:4])
    assert other_calib.entry != first.entry and openvino_int8.QUANTIZATIONS - q0 == 2
    other_w = OpenVINOEncoder(_tiny(8).image_encoder, batch=4, precision="int8", calibration=calib)
    assert other_w.entry not in (first.entry, other_calib.entry) and openvino_int8.QUANTIZATIONS - q0 == 3
    assert not [p for p in engine_cache.iterdir() if p.name.startswith(".")]  # no temporary left
    assert {first.entry, again.entry, f32.entry, other_calib.entry, other_w.entry} <= set(engine_cache.iterdir())


def test_int8_without_calibration_serves_openvino_f32_after_one_warning(engine_cache, caplog):
    model = _tiny()
    with caplog.at_level(logging.WARNING):
        fn = select_encoder(model, "cpu", "openvino", batch=4, precision="int8", calibration=None)
    assert fn.name == "openvino-f32"
    warnings = _engine_warnings(caplog)
    assert len(warnings) == 1 and "int8 encoder unavailable" in warnings[0].getMessage()
    assert "calibration" in warnings[0].getMessage()


def test_int8_without_nncf_serves_openvino_f32_after_one_warning(engine_cache, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` now fails
    calib = calibration_inputs(_images(4, seed=5))
    with caplog.at_level(logging.WARNING):
        fn = select_encoder(_tiny(), "cpu", "openvino", batch=4, precision="int8", calibration=lambda: calib)
    assert fn.name == "openvino-f32"
    assert len(_engine_warnings(caplog)) == 1


def test_assistant_on_int8_calibrates_on_its_bank_and_labels_like_f32(tiny_bank, engine_cache):
    kw = dict(device="cpu", encoder="tiny", answer_cache_entries=0, engine="openvino")
    on_f32 = Assistant.from_files("random", tiny_bank, engine_precision="f32", **kw)
    q0 = openvino_int8.QUANTIZATIONS
    on_int8 = Assistant.from_files("random", tiny_bank, engine_precision="int8", **kw)
    assert openvino_int8.QUANTIZATIONS - q0 == 1
    stats = on_int8.stats()
    assert stats["encoder_engine"] == "openvino-int8"
    assert stats["decoder_engine"] == f"openvino-{resolve_precision('auto')}"  # no int8 decoder: "auto"
    rng = np.random.default_rng(6)
    images = [rng.random((150, 170), dtype=np.float32) for _ in range(5)]
    ref = on_f32.predict([SliceInput(image=im) for im in images])
    got = on_int8.predict([SliceInput(image=im) for im in images])
    equal = np.mean([(x.label == y.label).mean() for x, y in zip(ref, got)])
    assert all(y.status == "ok" for y in got) and equal >= MIN_EQUAL_PIXELS_INT8, equal
    # the same bank at the next start: the cached int8 entry, no new quantization
    Assistant.from_files("random", tiny_bank, engine_precision="int8", **kw)
    assert openvino_int8.QUANTIZATIONS - q0 == 1


def test_float_hint_of_each_precision():
    assert float_hint("f32") == "f32" and float_hint("bf16") == "bf16"
    assert float_hint("int8") == resolve_precision("auto") == float_hint("auto")
    with pytest.raises(ValueError, match="unknown engine precision"):
        float_hint("int4")
