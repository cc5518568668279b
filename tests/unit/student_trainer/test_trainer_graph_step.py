"""The graph-ready training step (student_trainer.static_step) on the CPU: the same losses as its eager
reference for a fixed seed, no host sync in any method's step, and its pieces (device index stream,
fixed-round cleaning, foreach SGD) against the code they replace. Seconds in all (32², batch 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.components import largest_cc_fixed, largest_cc_torch
from shared.config import load_settings
from student_trainer.assistant_link import PseudoLabelRequest, PseudoLabelResult
from student_trainer.benchmark import count_ops
from student_trainer.config import TrainSettings
from student_trainer.static_step import DeviceIndexStream, sgd_foreach
from student_trainer.train import Trainer

# fp32 on the CPU; the two paths differ in summation order only (foreach SGD vs torch SGD's loop)
LOSS_RTOL = 1e-4


class StripesLink:
    """An assistant stand-in with a real answer to fuse: a label map of horizontal class bands and
    varied confidences, so the fusion rule takes the assistant's label on some pixels."""

    def __init__(self) -> None:
        self.pending: dict[str, PseudoLabelRequest] = {}

    def submit(self, request: PseudoLabelRequest) -> str:
        rid = str(len(self.pending) + 1000 * id(request) % 7919)
        self.pending[rid] = request
        return rid

    def result(self, request_id: str, timeout: float) -> PseudoLabelResult | None:
        req = self.pending.pop(request_id)
        b, h, w = req.images.shape
        rows = (np.arange(h) * 4 // h).astype(np.uint8)
        labels = np.broadcast_to(rows[None, :, None], (b, h, w)).copy()
        conf = np.tile(np.array([0.9, 0.3, 0.8, 0.6], np.float32), (b, 1))
        return PseudoLabelResult(labels=labels, confidence=conf)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        self.pending.clear()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from shared.data.synth import write_msd_dataset

    out = tmp_path_factory.mktemp("graph_synth")
    write_msd_dataset(out, cases=6, seed=0)
    return out


def _cfg(synth: Path, tmp: Path, method: str, **extra) -> TrainSettings:
    return load_settings(
        TrainSettings,
        None,
        method=method,
        device="cpu",
        progress=False,
        out_dir=tmp,
        data={"root": synth, "n_labeled": 3, "image_size": 32},
        batch_size=8,
        labeled_bs=4,
        max_iters=3,
        bcp={"pretrain_iters": 2, "lcc_backend": "torch"},
        vessa={"warmup_iters": 1},
        step={"mode": "graph", "assistant_refresh_every": 1},
        **extra,
    )


def _run(cfg: TrainSettings, eager_reference: bool) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    link = StripesLink() if cfg.method == "bcp_vessa" else None
    trainer = Trainer(cfg, link=link)
    assert trainer.static is not None
    trainer.static.eager_reference = eager_reference
    losses = []
    while trainer.step < trainer.total_steps:
        _, out, _ = trainer.train_step()
        losses.append({k: float(v.detach()) for k, v in out.items()})
    return losses, [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("method", ["supervised", "bcp", "bcp_vessa"])
def test_graph_step_matches_eager_reference(synth, tmp_path, method):
    """Same seed, same device draws: the graph-ready step (fixed-round cleaning, foreach SGD with a
    device learning rate) and the eager reference (converging cleaning, torch.optim.SGD) give the same
    losses at every step, through BCP's pre-training, the switch to self-training and (bcp_vessa) the
    assistant table's refresh with teacher prompts."""
    graph, p_graph = _run(_cfg(synth, tmp_path / "g", method), eager_reference=False)
    eager, p_eager = _run(_cfg(synth, tmp_path / "e", method), eager_reference=True)
    assert len(graph) == len(eager) == (5 if method != "supervised" else 3)
    worst = 0.0
    for step, (g, e) in enumerate(zip(graph, eager, strict=True)):
        assert g.keys() == e.keys()
        for k in g:
            assert g[k] == pytest.approx(e[k], rel=LOSS_RTOL, abs=1e-6), (step, k, g[k], e[k])
            worst = max(worst, abs(g[k] - e[k]) / max(abs(e[k]), 1e-12))
    print(f"{method}: largest relative loss difference graph vs eager {worst:.2e}")
    for a, b in zip(p_graph, p_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if method == "bcp_vessa":
        assert 0 < graph[-1]["vessa_from_assistant"] < 1  # the table's answers were really fused
        assert graph[-1]["vessa_answered"] == 1.0
    # and the graph path is not trivially the reference: its losses moved between steps
    assert graph[0]["loss"] != graph[-1]["loss"]


@pytest.mark.parametrize("method", ["supervised", "bcp", "bcp_vessa"])
def test_graph_step_has_no_host_sync(synth, tmp_path, method):
    """The op counter that found BCP's one sync per eager step finds none in the graph-ready step of
    each method (BCP pre-training: the first steps of `bcp`)."""
    for mode in ("eager", "graph"):
        cfg = _cfg(synth, tmp_path / mode, method)
        cfg = cfg.model_copy(update={"step": cfg.step.model_copy(update={"mode": mode})})
        link = StripesLink() if method == "bcp_vessa" else None
        trainer = Trainer(cfg, link=link)
        counts = []
        # counted (slow: every op goes through Python): the second step (BCP: pre-training, after its
        # first) and the last (BCP: self-training, after the switch and, for VESSA, the table refresh)
        while trainer.step < trainer.total_steps:
            if trainer.step in (1, trainer.total_steps - 1):
                counts.append(count_ops(trainer.train_step))
            else:
                trainer.train_step()
        assert len(counts) == 2
        if mode == "graph":
            assert all(c["syncs_per_it"] == 0 for c in counts), [c["sync_ops"] for c in counts]
        elif method != "supervised":
            # the eager self-training step checks the cleaning's convergence on the host
            assert counts[-1]["syncs_per_it"] >= 1, counts[-1]


def test_device_index_stream_is_successive_permutations():
    gen = torch.Generator().manual_seed(0)
    s = DeviceIndexStream(10, 4, gen, torch.device("cpu"), epochs=2)
    taken = []
    for _ in range(30):  # several refills
        s.before_step()
        taken.append(s.take())
    flat = torch.cat(taken)
    for e in range(len(flat) // 10):
        assert sorted(flat[10 * e : 10 * (e + 1)].tolist()) == list(range(10)), e
    # a saved stream (with its generator's state, which the trainer's checkpoint holds) continues exactly
    state, gen_state = s.state_dict(), gen.get_state()
    nxt = []
    for _ in range(3):  # past the next refill
        s.before_step()
        nxt.append(s.take())
    gen2 = torch.Generator().manual_seed(99)
    s2 = DeviceIndexStream(10, 4, gen2, torch.device("cpu"), epochs=2)
    s2.load_state_dict(state)
    gen2.set_state(gen_state)
    for want in nxt:
        s2.before_step()
        assert torch.equal(s2.take(), want)


def test_fixed_round_cleaning_matches_converging_and_flags_too_few_rounds():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    seg = torch.from_numpy((ndimage.gaussian_filter(rng.random((6, 64, 64)), 3) * 80).astype(np.int64) % 4)
    want = largest_cc_torch(seg, 4)
    got, ok = largest_cc_fixed(seg, 4, rounds=12)
    assert bool(ok) and torch.equal(got, want)
    # a long snake needs many rounds: one round does not converge and says so
    snake = torch.zeros(1, 32, 32, dtype=torch.int64)
    for r in range(0, 32, 4):
        snake[0, r, :] = 1
        snake[0, r : r + 4, 31 if (r // 4) % 2 == 0 else 0] = 1
    _, ok1 = largest_cc_fixed(snake, 2, rounds=1)
    assert not bool(ok1)


def test_sgd_foreach_is_torch_sgd():
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    opt = torch.optim.SGD(a, lr=0.01, momentum=0.9, weight_decay=1e-4)
    bufs = [torch.zeros_like(p) for p in b]
    for step in range(4):
        grads = [torch.randn_like(p) for p in a]
        for p, g in zip(a, grads, strict=True):
            p.grad = g.clone()
        for g_ in opt.param_groups:
            g_["lr"] = 0.01 * (1 - step / 4)
        opt.step()
        sgd_foreach(b, [g.clone() for g in grads], bufs, torch.tensor(0.01 * (1 - step / 4)), 0.9, 1e-4)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
