"""Stage-1 training: the assistant learns reference-guided segmentation on the labeled exemplars alone.

Episodic: each query is a labeled exemplar, its K templates are retrieved from *other* patients'
exemplars (never its own, so it cannot copy its own label), with some randomness among the nearest 2K.
With a single labeled patient they come from its other cases (another labeled frame) first, then from
its own case, but never within SAME_PATIENT_WINDOW slices of the query (template_exclusion).
Half the episodes carry a simulated student mask as the dense prompt (simulated_student.py), the others
prompt with templates only; box, points, mask and text prompts are dropped at random. The encoder is
frozen, so episodes run on the bank's cached embeddings: one encoder pass per exemplar, ever.
Loss: multi-class cross-entropy over [background, classes] + soft Dice + MSE of the predicted IoU.
Self-training (`pseudo_bank`, `p_pseudo`): some steps' queries are a teacher's confident answers on
unlabeled slices (assistant_server/training/pseudo_bank.py), with templates from the labeled bank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from tqdm import tqdm

from assistant_server.assistant.options import InferenceOptions
from assistant_server.bank import TemplateBank
from assistant_server.checkpoint import build_model, load_checkpoint, read_checkpoint, save_checkpoint
from assistant_server.cpu_memory import keep_freed_memory
from assistant_server.modeling.foundation import module_state_hash
from assistant_server.modeling.vessa import PromptDropout, VessaConfig, VessaModel, combine_classes
from assistant_server.precision import autocast
from assistant_server.training.simulated_student import simulate_student
from shared.config import VessaSettings, save_resolved, settings_dict


class Stage1Settings(VessaSettings):
    """`vessa assistant train` settings (YAML keys, `VESSA_` env vars, or flags)."""

    bank: Path = Field(description="template bank directory (vessa bank build)")
    out: Path = Field(description="checkpoint file to write; latest/TensorBoard/config go beside it")
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-4  # pretrained parts: prompt encoder and mask decoder
    lr_new: float = 1e-3  # new parts: matcher, semantic tokens, dense cues
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    num_templates: int = 4
    p_student: float = 0.5
    # Episodes whose dense prompt is the model's own templates-only answer (no gradient through it): the
    # assistant learns to correct its own mistakes, which is what refinement passes ask of it at inference.
    p_self: float = 0.0
    # Augmented views of the bank (assistant_server/training/augmented_views.py): V views encoded once and cached
    # by content in `augment_store` (default <bank>/augmented); a step draws its episodes from one view,
    # a view other than the original with probability p_augment.
    augment_views: int = Field(0, ge=0, le=16)
    p_augment: float = 0.5
    augment_store: Path | None = None
    drop_box: float = 0.2
    drop_points: float = 0.3
    drop_mask: float = 0.2
    drop_text: float = 0.1
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    # Pixels within `boundary_px` of a class edge weigh 1 + boundary_weight in the cross-entropy: the
    # errors that cost Dice and HD95 sit on edges (RV/Myo, the thin classes), not in blob interiors.
    boundary_weight: float = Field(0.0, ge=0.0)
    boundary_px: int = Field(2, ge=1, le=16)
    # Cross-entropy class weights from the bank's own pixel counts, (1/freq)^class_balance normalised to
    # mean 1 (0 = unweighted, 0.5 = inverse square root): small classes count for more.
    class_balance: float = Field(0.0, ge=0.0, le=1.0)
    # Self-training (assistant_server/training/pseudo_bank.py): with probability p_pseudo a step's queries are
    # teacher-labeled slices of unlabeled patients; their templates still come from the labeled bank,
    # and the IoU head is not trained on them (its target would be agreement with the teacher).
    pseudo_bank: Path | None = None
    p_pseudo: float = Field(0.0, ge=0.0, le=1.0)
    encoder: str = "litemedsam"
    use_text_tokens: bool = True
    use_label_transfer: bool = True
    use_iou_head: bool = True
    seed: int = 0
    device: str | None = None
    save_every: int = 250
    log_every: int = 10
    resume: bool = False
    # Fine-tuning: start from this checkpoint's weights (a path) at step 0 with a fresh optimizer, instead
    # of newly initialised ones; "random"/"pretrained" (or None) start as a new run does.
    init: str | None = None
    threads: int | None = None
    # bf16 autocast on the CPU: about 2x faster where the CPU has native bf16 kernels (AVX512/AMX), but
    # many times slower where it has not (AVX2 only). "auto": on where it is fast (precision.cpu_bf16_fast)
    cpu_bf16: bool = False
    # The runtime that encodes the augmented views (assistant_server/engines): auto = OpenVINO at f32 on a
    # CPU (the eager embeddings to ~1e-5, 3x faster), PyTorch on a GPU; training itself is PyTorch.
    engine: Literal["auto", "torch", "openvino"] = "auto"
    # How the checkpoint is to be served (assistant_server/assistant/options.py), stored in it. The
    # default cleans the classes the bank shows as single blobs: free; +2.4/+3.3 Dice on the synthetic
    # hearts' val/test volumes, and on ACDC +0.2 Dice with HD95 halved (docs/results.md); refinement
    # stays opt-in (it costs a decoder pass per slice).
    inference: dict = Field(default_factory=lambda: {"largest_component": "auto"})

    @field_validator("cpu_bf16", mode="before")
    @classmethod
    def _auto_bf16(cls, v):
        if isinstance(v, str) and v.strip().lower() == "auto":
            from assistant_server.precision import cpu_bf16_fast

            return cpu_bf16_fast()
        return v


def boundary_map(labels: torch.Tensor, num_classes: int, px: int) -> torch.Tensor:
    """labels: (B, H, W) long -> (B, H, W) bool, True within `px` pixels of an edge between classes."""
    onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    k = 2 * px + 1
    dilated = F.max_pool2d(onehot, k, stride=1, padding=px)
    eroded = -F.max_pool2d(-onehot, k, stride=1, padding=px)
    return ((dilated - eroded) > 0.5).any(1)


def class_weights(labels: torch.Tensor, num_classes: int, power: float) -> torch.Tensor:
    """(C,) cross-entropy weights (1/freq)^power over the pixels of `labels`, mean 1; absent classes 1."""
    counts = torch.bincount(labels.flatten().long(), minlength=num_classes).double()
    present = counts > 0
    w = torch.ones(num_classes, dtype=torch.float64)
    w[present] = (counts[present] / counts.sum()).pow(-power)
    w[present] = w[present] / w[present].mean()
    return w.float()


def _loss(
    logits: torch.Tensor,
    iou: torch.Tensor,
    labels: torch.Tensor,
    s: Stage1Settings,
    ce_class_weight: torch.Tensor | None = None,
    train_iou: bool = True,
) -> dict[str, torch.Tensor]:
    """logits: (B, M, H, W) for classes 1..M; iou: (B, M); labels: (B, H, W) long; weights (M+1,)."""
    b, m, h, w = logits.shape
    full = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1).float()
    if s.boundary_weight > 0 or ce_class_weight is not None:
        # A weighted mean of per-pixel CE: with class weights alone it is torch's weighted CE.
        wmap = torch.ones(labels.shape, device=full.device)
        if ce_class_weight is not None:
            wmap = ce_class_weight.to(full.device)[labels]
        if s.boundary_weight > 0:
            wmap = wmap * (1 + s.boundary_weight * boundary_map(labels, m + 1, s.boundary_px).float())
        ce = (F.cross_entropy(full, labels, reduction="none") * wmap).sum() / wmap.sum()
    else:
        ce = F.cross_entropy(full, labels)
    probs = torch.softmax(full, dim=1)[:, 1:]
    onehot = F.one_hot(labels, m + 1).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum((0, 2, 3))
    dice = 1 - ((2 * inter + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)).mean()
    with torch.no_grad():
        pred = logits > 0
        gt = onehot > 0.5
        union = (pred | gt).sum((2, 3)).float()
        target = torch.where(
            union > 0, (pred & gt).sum((2, 3)).float() / union.clamp_min(1), torch.ones_like(union)
        )
    iou_mse = F.mse_loss(iou.float(), target)
    total = s.ce_weight * ce + s.dice_weight * dice
    if s.use_iou_head and train_iou:
        total = total + s.iou_weight * iou_mse
    return {"loss": total, "ce": ce, "dice": dice, "iou_mse": iou_mse}


#: With one labeled patient, a query's templates come from that patient too, but never from its own case
#: within this many slices of the query: the slice itself is its own label, and its immediate neighbours
#: (one slice spacing away: 5-10 mm in a cardiac short-axis stack) are near-copies of its anatomy and
#: label, so a template from them teaches copying, the shortcut the cross-patient rule shuts with two
#: or more patients. One slice is the smallest window that removes them; a wider one would leave a short
#: stack (8-12 slices) with too few templates for its middle slices.
SAME_PATIENT_WINDOW = 1


def template_exclusion(
    patients: list[str], cases: list[str], slices: list[int], window: int = SAME_PATIENT_WINDOW
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which exemplars may be a query's templates in a Stage-1 episode, and which are preferred.

    Returns (excluded, preferred), both (N, N) bool with rows = queries. With exemplars from two or more
    patients a query's own patient is excluded (the cross-patient rule) and nothing is preferred. With a
    single patient, exemplars of the query's own case within `window` slices of it are excluded, and the
    patient's other cases (e.g. its other labeled frames) are preferred over far slices of its own case.
    """
    same_patient = torch.tensor([[p == q for q in patients] for p in patients], dtype=torch.bool)
    n = len(patients)
    if len(set(patients)) >= 2:
        return same_patient, torch.zeros(n, n, dtype=torch.bool)
    same_case = torch.tensor([[a == b for b in cases] for a in cases], dtype=torch.bool)
    idx = torch.tensor(slices, dtype=torch.long)
    near = (idx[:, None] - idx[None, :]).abs() <= window
    return same_case & near, ~same_case


def _candidates(
    descriptors: torch.Tensor,
    patients: list[str],
    cases: list[str],
    slices: list[int],
    k: int,
    window: int = SAME_PATIENT_WINDOW,
) -> torch.Tensor:
    """For each exemplar, its 2k template candidates, (N, 2k) indices: the nearest exemplars of other
    patients; with a single labeled patient, the nearest of the patient's other
    cases first, then of its own case outside `window` slices of the query (template_exclusion)."""
    sim = descriptors @ descriptors.T
    excluded, preferred = template_exclusion(patients, cases, slices, window)
    # Cosine similarities lie in [-1, 1]: +4 puts every preferred exemplar before any other, -8 every
    # excluded one after all.
    sim = sim + 4.0 * preferred.float() - 8.0 * excluded.float()
    others = (~excluded).sum(1).min().item()
    if others == 0:
        raise ValueError(
            "Stage-1 training needs, for every labeled slice, a template it may use: another patient's, "
            f"or with one labeled patient another case's or a slice more than {window} away in its own case"
        )
    kk = min(2 * k, int(others))
    return sim.topk(kk, dim=1).indices


def sample_episodes(
    pool: torch.Tensor, cands: torch.Tensor, batch_size: int, k: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's episodes: queries drawn from `pool` (exemplar indices), each with k templates drawn at
    random among its candidates (`_candidates`). Returns queries (B,), templates (B, K) and the picks
    (B, K) (positions among the candidates, reused for pseudo-labeled queries)."""
    qi = pool[torch.randint(len(pool), (batch_size,), generator=g).to(pool.device)]
    n = cands.shape[1]
    # Fewer candidates than k (a tiny one-patient bank): each candidate is used again, in a random order.
    reps = -(-k // n)
    pick = torch.stack([torch.randperm(n, generator=g).repeat(reps)[:k] for _ in range(batch_size)])
    ti = torch.gather(cands[qi], 1, pick.to(cands.device) % n)  # (B, K)
    return qi, ti, pick


def _pseudo_queries(
    bank: TemplateBank, pseudo_dir: Path, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pseudo-labeled bank's embeddings (P, 256, 64, 64), labels (P, 256, 256) and, per exemplar,
    its 2k nearest labeled exemplars (P, 2k): the templates of a pseudo-labeled query."""
    pseudo = TemplateBank(pseudo_dir)
    pseudo.check_compatible(bank.classes, bank.encoder_id)
    if len(pseudo) == 0:
        raise ValueError(f"pseudo-labeled bank {pseudo_dir} is empty")
    shared_patients = set(pseudo.patient_ids()) & set(bank.patient_ids())
    if shared_patients:
        raise ValueError(
            f"pseudo-labeled bank {pseudo_dir} holds labeled patients {sorted(shared_patients)[:5]}: "
            "build it from unlabeled patients only"
        )
    pt = pseudo.tensors()
    sim = pt["descriptor"].float() @ bank.tensors()["descriptor"].float().T
    cands = sim.topk(min(2 * k, sim.shape[1]), dim=1).indices
    return pt["embedding"], pt["label"].long(), cands


def train_stage1(s: Stage1Settings, progress: Callable[[int, dict], None] | None = None) -> Path:
    """Run (or resume) Stage-1 training; returns the final checkpoint path. `progress(step, losses)` is
    called at every logged step (a fine-tune's status)."""
    InferenceOptions.from_dict(s.inference)  # a bad inference section fails now, not after training
    if s.p_student + s.p_self > 1:
        raise ValueError(f"p_student + p_self must be at most 1, got {s.p_student} + {s.p_self}")
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    keep_freed_memory(device)  # on the CPU a step's ~70 MB activations are reused, not faulted in again
    bank = TemplateBank(s.bank)
    t = bank.tensors()
    if len(bank) < 2:
        raise ValueError(f"bank {s.bank} holds {len(bank)} exemplars; Stage-1 training needs more")
    config = VessaConfig(
        encoder=s.encoder,
        num_templates=s.num_templates,
        use_text_tokens=s.use_text_tokens,
        use_label_transfer=s.use_label_transfer,
        use_iou_head=s.use_iou_head,
    )
    pretrained = s.encoder == "litemedsam"
    if s.init not in (None, "", "random", "pretrained"):
        model, payload = load_checkpoint(s.init)
        pretrained = payload["encoder"] == "litemedsam-pretrained"
    else:
        model = build_model(config, pretrained=pretrained and s.init != "random", seed=s.seed)
    bank.check_compatible(bank.classes, module_state_hash(model.image_encoder))
    model.to(device)
    model.image_encoder.requires_grad_(False)
    model.image_encoder.eval()

    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    latest = out.with_name(out.stem + ".latest.pt")
    save_resolved(s, out.parent, name=f"{out.stem}.config.resolved.yaml")

    pretrained_params = [
        p for n, p in model.named_parameters() if n.startswith(("prompt_encoder.", "mask_decoder."))
    ]
    new_params = [
        p
        for n, p in model.named_parameters()
        if not n.startswith(("prompt_encoder.", "mask_decoder.", "image_encoder."))
    ]
    opt = torch.optim.AdamW(
        [{"params": pretrained_params, "lr": s.lr}, {"params": new_params, "lr": s.lr_new}],
        weight_decay=s.weight_decay,
    )
    start = 0
    if s.resume and latest.exists():
        payload = read_checkpoint(latest)
        model.load_state_dict(payload["model"], strict=False)
        opt.load_state_dict(payload["optimizer"])
        start = int(payload["step"])
        print(f"resumed from {latest} at step {start}")

    base_lrs = [g["lr"] for g in opt.param_groups]
    num_classes = len(bank.classes)
    class_ids = list(range(1, num_classes))
    # On a GPU the bank's embeddings live on the device; on the CPU they stay float16 until used.
    emb_all = t["embedding"].to(device)
    labels_all = t["label"].to(device).long()
    text = bank.text.to(device)
    cands = _candidates(
        t["descriptor"].float(),
        bank.patient_ids(),
        [e.case_id for e in bank.exemplars],
        [e.slice_index for e in bank.exemplars],
        s.num_templates,
    ).to(device)
    views_emb, views_lab = None, None
    if s.augment_views:
        from assistant_server.engines import stored_embeddings_encoder
        from assistant_server.training.augmented_views import build_views

        views_emb, views_lab, counts = build_views(
            model,
            t["image"],
            t["label"],
            s.augment_views,
            s.augment_store or Path(s.bank) / "augmented",
            device,
            seed=s.seed,
            cpu_bf16=s.cpu_bf16,
            encode_fn=stored_embeddings_encoder(model, device, s.engine),
        )
        print(
            f"augmented views: {s.augment_views} x {len(bank)} exemplars, {counts['encoded']} encoded, {counts['reused']} from the store"
        )
        views_emb, views_lab = views_emb.to(device), views_lab.to(device).long()
    ce_w = class_weights(labels_all, num_classes, s.class_balance).to(device) if s.class_balance else None
    if ce_w is not None:
        print(
            "cross-entropy class weights:",
            ", ".join(f"{c.name}={w:.2f}" for c, w in zip(bank.classes, ce_w.tolist())),
        )
    pseudo = None
    if s.pseudo_bank is not None and s.p_pseudo > 0:
        p_emb, p_lab, p_cands = _pseudo_queries(bank, s.pseudo_bank, s.num_templates)
        pseudo = (p_emb.to(device), p_lab.to(device), p_cands.to(device))
        print(f"self-training: {len(p_emb)} pseudo-labeled exemplars, p_pseudo {s.p_pseudo}")
    has_fg = (labels_all.flatten(1) > 0).any(1)
    fg_idx = torch.nonzero(has_fg).flatten()
    dropout = PromptDropout(s.drop_box, s.drop_points, s.drop_mask, s.drop_text)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out.parent / "tb" / out.stem))
    amp = autocast(device, s.cpu_bf16)
    model.train()
    model.image_encoder.eval()
    bar = tqdm(
        range(start, s.steps), initial=start, total=s.steps, desc="stage-1", unit="step", dynamic_ncols=True
    )
    t0 = time.perf_counter()
    for step in bar:
        # Every random choice of a step derives from (seed, step): a resumed run repeats it exactly.
        g = torch.Generator(device="cpu").manual_seed(s.seed * 1_000_003 + step)
        torch.manual_seed(s.seed * 1_000_003 + step)
        lr_scale = (
            min(1.0, (step + 1) / max(1, s.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / s.steps))
        )
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_scale
        pool = (
            fg_idx
            if (len(fg_idx) and float(torch.rand((), generator=g)) < 0.9)
            else torch.arange(len(bank), device=device)
        )
        qi, ti, pick = sample_episodes(pool, cands, s.batch_size, s.num_templates, g)
        # One view per step: the query and its templates are transformed alike.
        emb_src, lab_src = emb_all, labels_all
        if views_emb is not None and float(torch.rand((), generator=g)) < s.p_augment:
            v = int(torch.randint(len(views_emb), (), generator=g))
            emb_src, lab_src = views_emb[v], views_lab[v]
        q_emb, labels = emb_src[qi], lab_src[qi]
        from_pseudo = pseudo is not None and float(torch.rand((), generator=g)) < s.p_pseudo
        if from_pseudo:
            # A pseudo-labeled query (original view) with real templates from the labeled bank.
            p_emb, p_lab, p_cands = pseudo
            pq = torch.randint(len(p_emb), (s.batch_size,), generator=g).to(device)
            ti = torch.gather(p_cands[pq], 1, pick.to(device) % p_cands.shape[1])
            emb_src, lab_src = emb_all, labels_all
            q_emb, labels = p_emb[pq], p_lab[pq]
        with amp:
            tk = model.template_keys(emb_src[ti.flatten()].float())
            tk = tk.reshape(s.batch_size, s.num_templates, *tk.shape[1:])
            onehot = F.one_hot(lab_src[ti.flatten()], num_classes).permute(0, 3, 1, 2).float()
            tl = model.matcher.label_grid(onehot).reshape(
                s.batch_size, s.num_templates, num_classes, *tk.shape[-2:]
            )
            student = None
            r = float(torch.rand((), generator=g))
            if r < s.p_student:
                student = simulate_student(labels, num_classes, g)
            elif r < s.p_student + s.p_self:
                with torch.no_grad():
                    first = model(q_emb.float(), tk, tl, text, class_ids)
                    student = combine_classes(first.logits.float())  # (B, C, H, W): every class asked
            outp = model(q_emb.float(), tk, tl, text, class_ids, student_probs=student, dropout=dropout)
            losses = _loss(outp.logits, outp.iou, labels, s, ce_w, train_iou=not from_pseudo)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        if step % s.log_every == 0 or step == s.steps - 1:
            vals = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
            for k, v in vals.items():
                writer.add_scalar(f"stage1/{k}", v, step)
            writer.add_scalar("stage1/lr", opt.param_groups[0]["lr"], step)
            rate = (step + 1 - start) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{vals['loss']:.3f}", dice=f"{vals['dice']:.3f}", it_s=f"{rate:.2f}")
            if progress is not None:
                progress(step + 1, vals)
        if (step + 1) % s.save_every == 0 and step + 1 < s.steps:
            _save(latest, model, bank, s, step + 1, pretrained, opt)
    writer.close()
    _save(latest, model, bank, s, s.steps, pretrained, opt)
    return _save(out, model, bank, s, s.steps, pretrained, None)


def _save(
    path: Path, model: VessaModel, bank: TemplateBank, s: Stage1Settings, step: int, pretrained: bool, opt
) -> Path:
    train_config = settings_dict(s)
    train_config["bank_path"] = str(Path(s.bank).resolve())
    return save_checkpoint(
        path,
        model,
        bank.classes,
        train_config,
        bank.version,
        step,
        pretrained_encoder=pretrained,
        optimizer_state=opt.state_dict() if opt is not None else None,
        extra={"inference": InferenceOptions.from_dict(s.inference).to_dict()},
    )
