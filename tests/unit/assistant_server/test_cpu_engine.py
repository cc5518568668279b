"""The CPU engines (assistant_server/engines): OpenVINO's encoder and mask decoder answer like PyTorch,
convert once per set of weights, write their cache atomically, and any failure falls back to PyTorch with
one warning.

All on the tiny encoder (a conversion takes about a second); the LiteMedSAM encoder's conversion takes
minutes on a small CPU and is checked by hand (numbers in the commit that added the engine).
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
from assistant_server.engines import (
    FallbackEncoder,
    engine_name,
    resolve_engine,
    select_encoder,
    select_mask_decoder,
)
from assistant_server.engines.cache import META, atomic_entry
from assistant_server.modeling.vessa import VessaConfig

ov = pytest.importorskip("openvino")  # the dev extra brings it; without it only the fallback is served

from assistant_server.engines import openvino_decoder as ov_decoder  # noqa: E402
from assistant_server.engines import openvino_encoder as ov_encoder  # noqa: E402
from assistant_server.engines.openvino_encoder import OpenVINOEncoder  # noqa: E402

# f32 hint: OpenVINO and PyTorch differ only in float rounding (measured ~1e-7 of the embedding scale)
F32_REL_TOL = 1e-3
# label maps of the random-weight tiny model: its class probabilities are near-ties, so an odd pixel may
# flip under different rounding; a wrong embedding (another slice's, or out of order) changes most
MIN_EQUAL_PIXELS = 0.999


@pytest.fixture
def engine_cache(tmp_path, monkeypatch) -> Path:
    """A private converted-model cache (VESSA_ENGINE_CACHE), never the user's ~/.cache."""
    path = tmp_path / "engines"
    monkeypatch.setenv("VESSA_ENGINE_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture
def warm_cache(_module_cache, monkeypatch) -> Path:
    """A converted-model cache shared by this module's tests that neither count conversions nor break
    entries: each model is converted once for all of them (a conversion costs seconds)."""
    monkeypatch.setenv("VESSA_ENGINE_CACHE", str(_module_cache))
    return _module_cache


@pytest.fixture
def conversions(monkeypatch) -> list[int]:
    """Counts calls of openvino.convert_model (the real one still runs)."""
    calls: list[int] = []
    real = ov.convert_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", counting)
    return calls


def _tiny(seed: int = 0):
    return build_model(VessaConfig(encoder="tiny"), pretrained=False, seed=seed).eval()


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def _engine_warnings(caplog) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("assistant_server.engines") and r.levelno == logging.WARNING
    ]


def test_openvino_f32_embeddings_match_pytorch(warm_cache):
    model = _tiny()
    enc = OpenVINOEncoder(model.image_encoder, batch=4, precision="f32")
    x = torch.rand(6, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # two chunks, the last padded
    with torch.inference_mode():
        ref = model.encode(x)
    got = enc(x)
    assert got.shape == ref.shape == (6, 256, 64, 64) and got.dtype == torch.float32
    assert (got - ref).abs().max().item() < F32_REL_TOL * ref.abs().max().item()
    assert torch.equal(enc(x[4:5]), got[4:5])  # a lone slice (padded) answers as in its batch
    assert enc.name == "openvino-f32" and enc.entry.parent == warm_cache


def test_assistant_on_openvino_labels_like_pytorch(tiny_bank, warm_cache):
    kw = dict(device="cpu", encoder="tiny", answer_cache_entries=0)
    on_torch = Assistant.from_files("random", tiny_bank, engine="torch", **kw)
    on_ov = Assistant.from_files("random", tiny_bank, engine="openvino", engine_precision="f32", **kw)
    assert on_torch.stats()["encoder_engine"] == "torch"
    assert on_ov.stats()["encoder_engine"] == "openvino-f32"
    rng = np.random.default_rng(3)
    images = [rng.random((150, 170), dtype=np.float32) for _ in range(5)]  # 4 + 1: a padded chunk
    ref = on_torch.predict([SliceInput(image=im) for im in images])
    got = on_ov.predict([SliceInput(image=im) for im in images])
    assert on_ov.stats()["encoded"] == 5
    for x, y in zip(ref, got):
        assert y.status == "ok" and y.label.shape == x.label.shape
        assert (x.label == y.label).mean() >= MIN_EQUAL_PIXELS
        assert np.allclose(x.confidence, y.confidence, atol=1e-3, equal_nan=True)
    # the cache holds the engine's embeddings as it holds PyTorch's (dtype, device)
    e_ov = on_ov.cache.get(got[0].slice_hash).embedding
    e_torch = on_torch.cache.get(ref[0].slice_hash).embedding
    assert e_ov.dtype == e_torch.dtype and e_ov.device == e_torch.device


def test_converted_model_is_cached_by_encoder_weights(engine_cache, conversions):
    x = torch.rand(2, 3, 256, 256)
    before = ov_encoder.CONVERSIONS
    first = OpenVINOEncoder(_tiny(seed=0).image_encoder, batch=2, precision="f32")
    assert first.converted and len(conversions) == 1
    again = OpenVINOEncoder(_tiny(seed=0).image_encoder, batch=2, precision="f32")  # a second start
    assert not again.converted and len(conversions) == 1 and again.entry == first.entry
    assert torch.equal(again(x), first(x))
    # the IR is fp32 and the precision a compile hint: one entry serves both
    bf16 = OpenVINOEncoder(_tiny(seed=0).image_encoder, batch=2, precision="bf16")
    assert not bf16.converted and bf16.entry == first.entry
    other = OpenVINOEncoder(_tiny(seed=1).image_encoder, batch=2, precision="f32")  # other weights
    assert other.converted and len(conversions) == 2 and other.entry != first.entry
    assert ov_encoder.CONVERSIONS - before == 2
    assert _entries(engine_cache) == sorted([first.entry, other.entry])
    assert all((e / META).is_file() for e in _entries(engine_cache))
    assert not [p for p in engine_cache.iterdir() if p.name.startswith(".")]  # no temporary left


def test_cache_entry_appears_whole_or_not_at_all(tmp_path):
    entry = tmp_path / "engines" / "openvino-abc"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_entry(entry) as tmp:
            (tmp / "encoder.xml").write_text("<half")
            raise RuntimeError("killed mid-conversion")
    assert not entry.exists() and list(entry.parent.iterdir()) == []
    with atomic_entry(entry) as tmp:
        (tmp / "encoder.xml").write_text("<net/>")
    assert (entry / "encoder.xml").read_text() == "<net/>"


def test_auto_engine_choice():
    assert resolve_engine("auto", "cpu", "litemedsam") == "openvino"
    assert resolve_engine("auto", "cpu", "tiny") == "torch"  # milliseconds already: nothing to convert
    assert resolve_engine("openvino", "cuda", "litemedsam") == "torch"  # the GPU path stays PyTorch
    assert resolve_engine("torch", "cpu", "litemedsam") == "torch"
    with pytest.raises(ValueError, match="unknown encoder engine"):
        resolve_engine("tensorrt", "cpu")


def test_missing_openvino_falls_back_to_pytorch_with_one_warning(
    tiny_bank, engine_cache, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    assert resolve_engine("auto", "cpu", "litemedsam") == "torch"
    with caplog.at_level(logging.WARNING):
        a = Assistant.from_files("random", tiny_bank, device="cpu", encoder="tiny", engine="openvino")
        out = a.predict([SliceInput(image=np.random.default_rng(0).random((100, 120), dtype=np.float32))])
    assert out[0].status == "ok" and a.stats()["encoder_engine"] == "torch"
    warnings = _engine_warnings(caplog)
    assert len(warnings) == 1 and "using PyTorch" in warnings[0].getMessage()


def test_corrupt_cache_entry_falls_back_once_and_is_rebuilt_next_start(
    tiny_bank, engine_cache, conversions, caplog
):
    kw = dict(device="cpu", encoder="tiny", engine="openvino", engine_precision="f32")
    Assistant.from_files("random", tiny_bank, **kw)
    (entry,) = [e for e in _entries(engine_cache) if (e / "encoder.bin").is_file()]  # beside the decoder's
    data = bytearray((entry / "encoder.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / "encoder.bin").write_bytes(bytes(data))
    image = np.random.default_rng(1).random((128, 128), dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        a = Assistant.from_files("random", tiny_bank, **kw)
        assert a.predict([SliceInput(image=image)])[0].status == "ok"
    assert a.stats()["encoder_engine"] == "torch"
    warnings = _engine_warnings(caplog)
    assert len(warnings) == 1 and "sha256" in warnings[0].getMessage()
    assert not entry.exists()  # dropped, so the next start converts again instead of failing again
    b = Assistant.from_files("random", tiny_bank, **kw)
    # encoder + decoder at the first start, the encoder again now; the decoder's entry was sound
    assert b.stats()["encoder_engine"] == "openvino-f32" and len(conversions) == 3


def test_engine_that_raises_on_a_call_falls_back_for_good(caplog):
    model = _tiny()
    calls: list[int] = []

    def broken(images: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("infer request failed")

    enc = FallbackEncoder(broken, model.encode, "openvino-bf16")
    x = torch.rand(2, 3, 256, 256)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        first, second = enc(x), enc(x)
        ref = model.encode(x)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert len(calls) == 1 and engine_name(enc) == "torch"
    assert len(_engine_warnings(caplog)) == 1


def test_torch_engine_is_the_model_itself():
    model = _tiny()
    assert select_encoder(model, "cpu", "torch") == model.encode
    assert engine_name(model.encode) == "torch"


# --------------------------------------------------------------------------------------------- decoder
def _decoder_inputs(n: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 256, 64, 64, generator=g),
        torch.randn(n, tokens, 256, generator=g),
        0.1 * torch.randn(n, 256, 64, 64, generator=g),
    )


def test_openvino_decoder_matches_pytorch_for_any_pairs_and_tokens(warm_cache):
    """Dynamic shapes: 1, 3 and 7 (slice, class) pairs, with and without the text token (T = 6 / 5)."""
    model = _tiny()
    dec = select_mask_decoder(model, "cpu", "openvino", "f32")
    assert engine_name(dec) == "openvino-f32"
    pe = model.prompt_encoder.get_dense_pe()
    for n, tokens in ((1, 6), (3, 6), (7, 5)):
        e, sparse, dense = _decoder_inputs(n, tokens, seed=n)
        with torch.inference_mode():
            masks, iou = model.mask_decoder.predict_masks(
                image_embeddings=e, image_pe=pe, sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense
            )
        got_masks, got_iou = dec(e, sparse, dense)
        assert got_masks.shape == (n, 1, 256, 256) and got_iou.shape == (n, 1)
        scale = masks[:, :1].abs().max().item()
        assert (got_masks - masks[:, :1]).abs().max().item() < F32_REL_TOL * scale
        assert (got_iou - iou[:, :1]).abs().max().item() < 1e-4


def test_converted_decoder_is_cached_by_decoder_weights(engine_cache, conversions):
    before = ov_decoder.CONVERSIONS
    model = _tiny(seed=0)
    pe = model.prompt_encoder.get_dense_pe()
    first = ov_decoder.OpenVINOMaskDecoder(model.mask_decoder, pe, precision="f32")
    again = ov_decoder.OpenVINOMaskDecoder(_tiny(seed=0).mask_decoder, pe, precision="f32")
    assert first.converted and not again.converted and again.entry == first.entry
    x = _decoder_inputs(2, 6)
    assert all(torch.equal(a, b) for a, b in zip(first(*x), again(*x)))
    tuned = _tiny(seed=0)
    with torch.no_grad():
        tuned.mask_decoder.iou_token.weight.add_(0.5)  # a fine-tuned decoder never meets the old graph
    other = ov_decoder.OpenVINOMaskDecoder(tuned.mask_decoder, pe, precision="f32")
    assert other.converted and other.entry != first.entry
    assert len(conversions) == 2 and ov_decoder.CONVERSIONS - before == 2


def test_assistant_with_both_engines_labels_like_pytorch_and_names_them(tiny_bank, warm_cache):
    kw = dict(device="cpu", encoder="tiny", answer_cache_entries=0, options={"refine_passes": 1})
    on_torch = Assistant.from_files("random", tiny_bank, engine="torch", **kw)
    on_ov = Assistant.from_files("random", tiny_bank, engine="openvino", engine_precision="f32", **kw)
    assert on_ov.stats()["decoder_engine"] == "openvino-f32" and on_torch.stats()["decoder_engine"] == "torch"
    rng = np.random.default_rng(5)
    images = [rng.random((140, 160), dtype=np.float32) for _ in range(3)]
    ref = on_torch.predict_volume([SliceInput(image=im) for im in images])
    got = on_ov.predict_volume([SliceInput(image=im) for im in images])
    for x, y in zip(ref, got):
        assert (x.label == y.label).mean() >= MIN_EQUAL_PIXELS
        assert np.allclose(x.confidence, y.confidence, atol=1e-3, equal_nan=True)
    # "auto" leaves the tiny test model's decoder on PyTorch (nothing worth converting)
    assert select_mask_decoder(_tiny(), "cpu", "auto") is None


def test_decoder_engine_that_raises_falls_back_for_good(tiny_bank, warm_cache, caplog):
    a = Assistant.from_files("random", tiny_bank, device="cpu", encoder="tiny", engine="openvino", engine_precision="f32")
    real = a.decode_fn._engine
    calls: list[int] = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("infer request failed")

    a.decode_fn._engine = broken
    image = np.random.default_rng(2).random((128, 128), dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        first = a.predict([SliceInput(image=image)])[0]
        second = a.predict([SliceInput(image=image, slice_hash="again")])[0]
    assert first.status == second.status == "ok" and len(calls) == 1
    assert a.stats()["decoder_engine"] == "torch" and real is not None
    warnings = _engine_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("decoder engine")
