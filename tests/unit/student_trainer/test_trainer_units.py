"""Unit tests of the student trainer's pure parts: UNet shapes, losses, EMA, LCC cleaning, BCP masks,
fusion rule, prefetch/fallback logic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from shared.components import (
    largest_cc_numpy,
    largest_cc_torch,
    largest_connected_component,
)
from student_trainer.assistant_link import PseudoLabelRequest, PseudoLabelResult
from student_trainer.bcp import bcp_pretrain_loss, bcp_self_train_loss, box_mask, paste, pseudo_label
from student_trainer.ema import make_teacher, update_ema_params, update_ema_state
from student_trainer.fusion import fuse_pseudo_labels
from student_trainer.losses import dice_loss, masked_cross_entropy, mix_loss
from student_trainer.mean_teacher import sigmoid_rampup
from student_trainer.prefetch import PseudoLabelPrefetcher
from student_trainer.unet import UNet, count_parameters

# -- UNet ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_unet_forward_shapes(upsampling):
    torch.manual_seed(0)
    model = UNet(1, 4, upsampling).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 256, 256)).shape == (2, 4, 256, 256)
        assert model(torch.rand(3, 1, 64, 96)).shape == (3, 4, 64, 96)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("ConvTranspose2d" in kinds) == (upsampling == "transpose")


def test_unet_matches_ssl4mis_layout():
    model = UNet(1, 4, "bilinear")
    # SSL4MIS key names, so their checkpoints load
    keys = set(model.state_dict())
    assert "encoder.in_conv.conv_conv.0.weight" in keys
    assert "decoder.up1.conv1x1.weight" in keys
    assert "decoder.out_conv.weight" in keys
    drops = [m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.05, 0.1, 0.2, 0.3, 0.5]
    # 16-32-64-128-256 features: about 1.8 M parameters
    assert 1.7e6 < count_parameters(model) < 1.9e6


def test_unet_channels_last_same_output():
    torch.manual_seed(0)
    model = UNet(1, 3).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# -- losses -----------------------------------------------------------------------------------------


def test_dice_loss_perfect_and_worst():
    label = torch.randint(0, 3, (2, 16, 16))
    perfect = torch.nn.functional.one_hot(label, 3).permute(0, 3, 1, 2).float()
    assert dice_loss(perfect, label).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.nn.functional.one_hot((label + 1) % 3, 3).permute(0, 3, 1, 2).float()
    assert dice_loss(wrong, label).item() == pytest.approx(1.0, abs=1e-6)


def test_mix_loss_weights_follow_bcp():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    a = torch.randint(0, 3, (2, 8, 8))
    b = torch.randint(0, 3, (2, 8, 8))
    mask = torch.ones(2, 8, 8)
    mask[:, 2:6, 2:6] = 0
    d1, c1 = mix_loss(logits, a, b, mask, u_weight=0.5, unlab=False)
    d2, c2 = mix_loss(logits, a, b, mask, u_weight=0.5, unlab=True)
    ce_img = masked_cross_entropy(logits, a, mask)
    ce_patch = masked_cross_entropy(logits, b, 1 - mask)
    assert c1.item() == pytest.approx(ce_img.item() + 0.5 * ce_patch.item(), rel=1e-5)
    assert c2.item() == pytest.approx(0.5 * ce_img.item() + ce_patch.item(), rel=1e-5)
    # pixel weights of 1 change nothing; weights of 0 on the image part remove its CE
    d3, c3 = mix_loss(logits, a, b, mask, img_pixel_weight=torch.ones(2, 8, 8))
    assert c3.item() == pytest.approx(c1.item(), rel=1e-6) and d3.item() == pytest.approx(d1.item(), rel=1e-6)
    _, c4 = mix_loss(logits, a, b, mask, img_pixel_weight=torch.zeros(2, 8, 8))
    assert c4.item() == pytest.approx(0.5 * ce_patch.item(), rel=1e-5)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 200) == pytest.approx(np.exp(-5))
    assert sigmoid_rampup(200, 200) == 1.0
    assert sigmoid_rampup(500, 200) == 1.0
    assert sigmoid_rampup(10, 0) == 1.0


# -- EMA ------------------------------------------------------------------------------------------


def test_ema_updates():
    torch.manual_seed(0)
    student = UNet(1, 2)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = next(iter(teacher.parameters())).clone()
    after_student = next(iter(student.parameters())).clone()
    a = update_ema_params(teacher, student, 0.99, global_step=0)
    assert a == 0.0  # first step copies (SSL4MIS: min(1 - 1/(step+1), alpha))
    torch.testing.assert_close(next(iter(teacher.parameters())), after_student)
    teacher2 = make_teacher(UNet(1, 2))
    w0 = next(iter(teacher2.parameters())).clone()
    update_ema_state(teacher2, student, 0.9)
    torch.testing.assert_close(next(iter(teacher2.parameters())), 0.9 * w0 + 0.1 * after_student)
    assert not torch.equal(before, after_student)


def test_ema_state_includes_bn_statistics():
    student, teacher = UNet(1, 2), UNet(1, 2)
    bn_s = student.encoder.in_conv.conv_conv[1]
    bn_t = teacher.encoder.in_conv.conv_conv[1]
    bn_s.running_mean.fill_(1.0)
    bn_t.running_mean.fill_(0.0)
    bn_s.num_batches_tracked.fill_(7)
    update_ema_state(teacher, student, 0.99)
    assert torch.allclose(bn_t.running_mean, torch.full_like(bn_t.running_mean, 0.01))
    assert int(bn_t.num_batches_tracked) == 7


# -- largest connected component --------------------------------------------------------------------


def test_largest_cc_keeps_biggest_component_per_class():
    seg = np.zeros((1, 12, 12), np.int64)
    seg[0, 0:2, 0:2] = 1  # small RV blob (4 px)
    seg[0, 5:9, 5:9] = 1  # big RV blob (16 px)
    seg[0, 0:3, 9:12] = 2  # Myo (9 px), alone
    seg[0, 10, 0] = 3  # LV single pixel
    seg[0, 11, 11] = 3  # LV single pixel, diagonal-free: two components of 1 px
    out = largest_cc_numpy(seg, 4)
    assert (out[0, 0:2, 0:2] == 0).all()
    assert (out[0, 5:9, 5:9] == 1).all()
    assert (out[0, 0:3, 9:12] == 2).all()
    assert (out == 3).sum() == 1
    torch_out = largest_connected_component(torch.from_numpy(seg), 4, backend="torch")
    assert (torch_out.numpy() == 1).sum() == 16 and (torch_out.numpy() == 3).sum() == 1


def test_largest_cc_uses_8_connectivity():
    seg = np.zeros((1, 6, 6), np.int64)
    seg[0, 0, 0] = seg[0, 1, 1] = seg[0, 2, 2] = 1  # a diagonal line: one 8-connected component
    seg[0, 5, 5] = seg[0, 5, 4] = 1  # two pixels
    for out in (largest_cc_numpy(seg, 2), largest_cc_torch(torch.from_numpy(seg), 2).numpy()):
        assert out[0, 0, 0] == out[0, 1, 1] == out[0, 2, 2] == 1
        assert out[0, 5, 5] == 0


def test_largest_cc_backends_agree_on_random_maps():
    rng = np.random.default_rng(1)
    for _ in range(5):
        seg = (ndimage.gaussian_filter(rng.random((3, 40, 56)), 2.5) * 50).astype(np.int64) % 4
        a = largest_cc_numpy(seg, 4)
        b = largest_cc_torch(torch.from_numpy(seg), 4).numpy()
        # equal up to ties between equally large components: compare kept sizes per slice and class
        for i in range(3):
            assert np.array_equal(
                np.bincount(a[i].ravel(), minlength=4), np.bincount(b[i].ravel(), minlength=4)
            )


def test_largest_cc_torch_follows_a_spiral():
    """A one-pixel-wide spiral is one component whose labels must travel its whole length: the worst
    case for propagation, far beyond the rounds a check block runs."""
    n = 41
    seg = np.zeros((1, n, n), np.int64)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:  # walls every other ring, joined: a square spiral
        seg[0, top, left : right + 1] = 1
        seg[0, top : bottom + 1, right] = 1
        if bottom > top:
            seg[0, bottom, left : right + 1] = 1
        if left + 2 <= right:
            seg[0, top + 2 : bottom + 1, left] = 1
            seg[0, top + 2, left + 1] = 1  # the step inwards to the next turn
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    seg[0, n // 2, n // 2] = 2
    assert ndimage.label(seg[0] == 1, structure=np.ones((3, 3)))[1] == 1
    ref = largest_cc_numpy(seg, 3)
    out = largest_cc_torch(torch.from_numpy(seg), 3).numpy()
    assert np.array_equal(out, ref)


# -- BCP pieces -----------------------------------------------------------------------------------


def test_box_mask_geometry():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = box_mask(96, 96, 2 / 3, g)
        assert m.shape == (96, 96)
        assert int((m == 0).sum()) == 64 * 64  # int(96*2/3)^2 zeros, one box
        ys, xs = torch.nonzero(m == 0, as_tuple=True)
        assert ys.max() - ys.min() == 63 and xs.max() - xs.min() == 63


def test_paste_images_and_labels():
    m = torch.ones(4, 4)
    m[1:3, 1:3] = 0
    a, b = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    out = paste(a, b, m)
    assert out[0, 0].sum() == 4 and out[0, 0, 1, 1] == 1
    la, lb = torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 2)
    assert paste(la, lb, m).sum() == 8


def test_bcp_losses_are_finite_and_backprop():
    torch.manual_seed(0)
    model = UNet(1, 4)
    imgs_l, labs_l = torch.rand(4, 1, 32, 32), torch.randint(0, 4, (4, 32, 32))
    imgs_u = torch.rand(4, 1, 32, 32)
    mask = box_mask(32, 32)
    pre = bcp_pretrain_loss(model, imgs_l, labs_l, mask)
    pre["loss"].backward()
    with torch.no_grad():
        plab = pseudo_label(torch.softmax(model(imgs_u), 1), lcc=True)
    st = bcp_self_train_loss(model, imgs_l, labs_l, imgs_u, plab, mask, 0.5, torch.ones(4, 32, 32))
    assert torch.isfinite(st["loss"]) and torch.isfinite(pre["loss"])
    st["loss"].backward()


# -- fusion -----------------------------------------------------------------------------------------


def _fuse_inputs():
    # one slice, 1×4 pixels, 3 classes
    teacher = torch.tensor([[[1, 1, 2, 0]]])
    assistant = torch.tensor([[[1, 2, 1, 2]]])
    t_max = torch.tensor([[[0.99, 0.6, 0.95, 0.5]]])
    conf = torch.tensor([[0.9, 0.8, 0.7]])  # per class: bg 0.9, class1 0.8, class2 0.7
    return teacher, t_max, assistant, conf, torch.tensor([True])


def test_fusion_agree_confidence():
    t, tm, a, c, av = _fuse_inputs()
    out = fuse_pseudo_labels(t, tm, a, c, av, mode="agree_confidence", tau=0.75, teacher_tau=0.9, w_dis=0.3)
    # px0 agree -> 1 (w 1); px1 disagree, assistant class 2 conf 0.7 < tau -> teacher 1;
    # px2 disagree, assistant class 1 conf 0.8 >= tau but teacher sure (0.95) -> teacher 2;
    # px3 disagree, assistant class 2 conf 0.7 < tau -> teacher 0
    assert out.label.tolist() == [[[1, 1, 2, 0]]]
    assert out.weight.tolist() == [[[1.0, pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3)]]]
    out = fuse_pseudo_labels(t, tm, a, c, av, mode="agree_confidence", tau=0.6, teacher_tau=0.9, w_dis=0.3)
    # tau 0.6: px1 assistant 2 (0.7 >= 0.6, teacher 0.6 < 0.9) -> 2; px2 teacher sure -> 2; px3 -> 2
    assert out.label.tolist() == [[[1, 2, 2, 2]]]
    assert out.stats["agreement"].item() == pytest.approx(0.25)
    assert out.stats["from_assistant"].item() == pytest.approx(0.5)


def test_fusion_other_modes():
    t, tm, a, c, av = _fuse_inputs()
    assert fuse_pseudo_labels(t, tm, a, c, av, mode="teacher").label.tolist() == t.tolist()
    out = fuse_pseudo_labels(t, tm, a, c, av, mode="assistant")
    assert out.label.tolist() == a.tolist() and out.weight.min().item() == 1.0
    out = fuse_pseudo_labels(t, tm, a, c, av, mode="assistant_confident", tau=0.75, w_dis=0.5)
    assert out.label.tolist() == [[[1, 1, 1, 0]]]  # only class 1 (0.8) passes tau
    assert out.weight.tolist() == [[[1.0, 0.5, 0.5, 0.5]]]
    with pytest.raises(ValueError):
        fuse_pseudo_labels(t, tm, a, c, av, mode="bogus")  # type: ignore[arg-type]


def test_fusion_background_may_be_kept_from_overriding_organs():
    teacher = torch.tensor([[[1, 2, 0, 1]]])
    assistant = torch.tensor([[[0, 0, 2, 3]]])
    t_max = torch.full((1, 1, 4), 0.5)
    conf = torch.tensor([[0.99, 0.2, 0.8, 0.9]])  # background is always sure of itself
    av = torch.tensor([True])
    out = fuse_pseudo_labels(teacher, t_max, assistant, conf, av, mode="assistant_confident", tau=0.5)
    assert out.label.tolist() == [[[0, 0, 2, 3]]]  # the assistant's background erases the teacher's organs
    out = fuse_pseudo_labels(
        teacher, t_max, assistant, conf, av, mode="assistant_confident", tau=0.5, background_overrides=False
    )
    assert out.label.tolist() == [[[1, 2, 2, 3]]]  # organs found by the assistant still override
    assert out.weight.tolist() == [[[0.5, 0.5, 0.5, 0.5]]]
    out = fuse_pseudo_labels(
        teacher, t_max, assistant, conf, av, mode="agree_confidence", tau=0.5, background_overrides=False
    )
    assert out.label.tolist() == [[[1, 2, 2, 3]]]


def test_fusion_unanswered_slices_fall_back_to_teacher():
    t = torch.tensor([[[1, 1]], [[2, 2]]])
    a = torch.tensor([[[0, 0]], [[0, 0]]])
    out = fuse_pseudo_labels(
        t, torch.zeros(2, 1, 2), a, torch.ones(2, 3), torch.tensor([True, False]), mode="assistant"
    )
    assert out.label.tolist() == [[[0, 0]], [[2, 2]]]
    assert out.weight.tolist() == [[[1.0, 1.0]], [[1.0, 1.0]]]
    assert out.stats["answered"].item() == 0.5


# -- prefetch / fallback ------------------------------------------------------------------------------


class NoneLink:
    """An assistant that never answers (late or gone)."""

    def __init__(self):
        self.submitted: list[PseudoLabelRequest] = []
        self.asked: list[tuple[str, float]] = []

    def submit(self, request):
        self.submitted.append(request)
        return f"r{len(self.submitted)}"

    def result(self, request_id, timeout):
        self.asked.append((request_id, timeout))
        return None

    def stats(self):
        return {"submitted": len(self.submitted)}

    def close(self):
        pass


class FlakyLink(NoneLink):
    """Answers correctly, raises, or returns garbage, depending on the request number."""

    def __init__(self, mode_for):
        super().__init__()
        self.mode_for = mode_for

    def submit(self, request):
        rid = super().submit(request)
        if self.mode_for(len(self.submitted)) == "submit_error":
            raise ConnectionError("redis down")
        return rid

    def result(self, request_id, timeout):
        n = int(request_id[1:])
        req = self.submitted[n - 1]
        mode = self.mode_for(n)
        if mode == "raise":
            raise TimeoutError("gone")
        if mode == "bad":
            return PseudoLabelResult(
                labels=np.zeros((1, 2, 2), np.uint8), confidence=np.zeros((1, 3), np.float32)
            )
        b, h, w = req.images.shape
        return PseudoLabelResult(
            labels=np.ones((b, h, w), np.uint8), confidence=np.full((b, 3), 0.9, np.float32)
        )


def _planner(batch=2, size=8):
    counter = iter(range(10_000))

    def plan(step):
        idx = [next(counter) for _ in range(batch)]
        req = PseudoLabelRequest(
            keys=[f"k{i}" for i in idx], images=np.zeros((batch, size, size), np.float32)
        )
        return idx, req

    return plan


def test_prefetch_keeps_requests_ahead_and_counts_fallbacks():
    link = NoneLink()
    pf = PseudoLabelPrefetcher(link, depth=3, timeout_s=0.01, image_hw=(8, 8), num_classes=3)
    plan = _planner()
    for step in range(10):
        pf.fill(step, plan)
        # requests for step .. step+3 are in flight before step is consumed
        assert [e.step for e in pf.pending] == list(range(step, step + 4))
        result, entry = pf.take(step)
        assert result is None and entry.step == step
    assert len(link.submitted) == 13  # steps 0..12 submitted, 10..12 still in flight
    assert [rid for rid, _ in link.asked] == [f"r{i}" for i in range(1, 11)]
    assert all(t == 0.01 for _, t in link.asked)
    s = pf.summary()
    assert s["fallbacks"] == 10 and s["answered"] == 0 and s["late_or_missing"] == 10
    assert s["fallback_rate"] == 1.0
    assert pf.planned_indices() == [[20, 21], [22, 23], [24, 25]]
    assert pf.discard() == 3 and not pf.pending


def test_prefetch_survives_errors_and_recovers():
    modes = {2: "submit_error", 3: "raise", 4: "bad"}
    link = FlakyLink(lambda n: modes.get(n, "ok"))
    pf = PseudoLabelPrefetcher(link, depth=1, timeout_s=0.0, image_hw=(8, 8), num_classes=3)
    plan = _planner()
    got = []
    for step in range(6):
        pf.fill(step, plan)
        result, _ = pf.take(step)
        got.append(result is not None)
    assert got == [True, False, False, False, True, True]
    s = pf.summary()
    assert s["fallbacks"] == 3 and s["answered"] == 3
    assert s["submit_errors"] == 1 and s["result_errors"] == 1 and s["invalid"] == 1


def test_prefetch_without_link_and_order_checks():
    pf = PseudoLabelPrefetcher(None, depth=0, timeout_s=1.0, image_hw=(8, 8), num_classes=3)
    pf.fill(0, lambda s: ([s], None))
    result, entry = pf.take(0)
    assert result is None and entry.indices == [0] and entry.request_id is None
    with pytest.raises(RuntimeError):
        pf.take(5)
    pf.submit(1, [1], None)
    with pytest.raises(ValueError):
        pf.submit(3, [3], None)


def test_count_ops_counts_ops_and_host_syncs():
    from student_trainer.benchmark import count_ops

    x = torch.ones(4, 4)

    def step():
        y = (x + 1) * 2  # two ops
        torch.equal(y, x)  # a sync
        float(y.sum())  # an op and a sync (the scalar read back)

    out = count_ops(step)
    assert out["ops_per_it"] == 5
    assert out["syncs_per_it"] == 2 and out["sync_ops"] == {"equal": 1, "_local_scalar_dense": 1}
