"""benchmarks/cine_context.py runs end to end on tiny data (the tiny random model: its Dice means
nothing), and the temporal blend it measures is the z±1 blend of `volume_context`, over frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.data.cine import temporal_blend, write_cine_dataset


def test_temporal_blend_weights_the_neighbouring_frames() -> None:
    probs = [np.full((2, 3, 4, 4), float(t), np.float32) for t in range(4)]
    out = temporal_blend(probs, 0.25)
    # frame 1: 0.5·1 + 0.25·0 + 0.25·2; frame 0 (periodic cycle): 0.5·0 + 0.25·3 + 0.25·1
    assert np.allclose(out[1], 1.0) and np.allclose(out[0], 1.0) and np.allclose(out[3], 0.5 * 3 + 0.25 * 2 + 0.25 * 0)
    edge = temporal_blend(probs, 0.25, cyclic=False)
    assert np.allclose(edge[0], 0.25) and np.allclose(edge[3], 2.75)
    assert all(np.array_equal(a, b) for a, b in zip(temporal_blend(probs, 0.0), probs))
    with pytest.raises(ValueError, match="1/3"):
        temporal_blend(probs, 0.4)
    with pytest.raises(ValueError, match="one shape"):
        temporal_blend([probs[0], probs[1][:1]], 0.1)


def test_cine_context_benchmark_runs_on_tiny_data(tiny_bank, tmp_path, capsys) -> None:
    from benchmarks.cine_context import main

    data = tmp_path / "cine"
    write_cine_dataset(data, cases=1, frames=3, seed=0, depth=2)
    out = tmp_path / "res.json"
    res = main(["--data", str(data), "--ckpt", "random", "--bank", str(tiny_bank), "--encoder", "tiny", "--device", "cpu", "--weights", "0.2", "--json", str(out)])
    assert list(res["summary"]) == ["plain", "refine-own", "time-0.2"]
    assert res["cases"] == 1 and res["frames"] == 3
    for v, rows in res["per_frame"].items():
        assert [r["frame"] for r in rows] == [0, 1, 2], v
        assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("1", "2", "3"))
    assert json.loads(out.read_text())["summary"] == res["summary"]
    assert "| time-0.2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--ckpt", "random", "--bank", str(tiny_bank), "--weights", "0.5"])
