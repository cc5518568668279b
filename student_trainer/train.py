"""`vessa train`: the Stage-2 student trainer (supervised | mean_teacher | bcp | bcp_vessa).

One loop for every method; what differs between methods (batches, phases, loss, teacher) is the
method's strategy class (`student_trainer.methods`), looked up once from `cfg.method`. The data sit in
memory as tensors on the training device (loaded once, resized to `data.image_size`); batches are drawn
by index and augmented on the device. A step: draw indices -> augment -> method loss -> SGD step ->
teacher update (teacher methods). Every `val_every`
iterations of a phase (and at its end) the student is validated on the validation volumes (3D metrics,
slice-wise 2D inference); the best checkpoint by mean foreground Dice is kept (`best.pt`; for BCP's
pre-training phase `best_pretrain.pt`), `latest.pt` every `save_every` iterations and at the end, each
with the resolved config next to it. `resume=True` continues from `latest.pt` at its step.

Phases (`TrainingMethod.phases`): supervised and mean_teacher have one (`train`, max_iters); bcp and
bcp_vessa have `pretrain` (bcp.pretrain_iters) then `train` (max_iters). Steps are numbered globally
across phases.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.components import largest_connected_component
from shared.config import save_resolved
from shared.data.pseudo import PseudoLabeledSlices
from student_trainer import bcp as bcp_lib
from student_trainer.assistant_link import AssistantLink
from student_trainer.bcp_vessa import VessaPseudoLabeler, build_link
from student_trainer.checkpoint import FORMAT, KIND, atomic_save, classes_to_list, load_checkpoint
from student_trainer.config import TrainSettings
from student_trainer.data import Augmenter, IndexSampler, TrainingData, load_training_data, to_device
from student_trainer.ema import make_teacher
from student_trainer.evaluate import ValidationSet, load_validation_set, validate
from student_trainer.inference import autocast_for, resize_images, resolve_device
from student_trainer.methods import StepInputs, TrainingMethod, UnlabeledDraw, get_method
from student_trainer.static_step import StaticStep
from student_trainer.unet import UNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    name: str  # "pretrain" | "train"
    start: int  # first global step
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def make_phases(method: TrainingMethod) -> list[Phase]:
    """The method's phases with their global step ranges."""
    phases, start = [], 0
    for name, n in method.phases():
        phases.append(Phase(name, start, n))
        start += n
    return phases


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """SSL4MIS poly decay base * (1 - step/total)^power, 0 past the end."""
    return base * max(0.0, 1.0 - step / total) ** power


def _gen_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


class EagerInputs(StepInputs):
    """A training method's inputs in the eager step: indices from the host samplers (bcp_vessa: the
    prefetcher's planned batch, with the assistant's answer), BCP's box on the host generator (no device
    sync), the converging cleaning (`bcp.lcc_backend`), and the (optionally compiled) forwards."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer.data, trainer.augmenter, trainer.gen_dev)
        self.t = trainer

    @property
    def student(self) -> nn.Module:
        return self.t._net(self.t.model)

    @property
    def teacher(self) -> nn.Module | None:
        return None if self.t.teacher is None else self.t._net(self.t.teacher)

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast_for(self.t.device, self.t.amp)

    def _on_device(self, indices: list[int]) -> torch.Tensor:
        return to_device(torch.as_tensor(indices), self.t.device)

    def labeled_indices(self, n: int) -> torch.Tensor:
        return self._on_device(self.t.labeled_sampler.next(n))

    def unlabeled(self, n: int) -> UnlabeledDraw:
        t = self.t
        if t.vessa is None:
            return UnlabeledDraw(self._on_device(t.unlabeled_sampler.next(n)))
        indices, result = t.vessa.batch(t.step)
        return UnlabeledDraw(self._on_device(indices), t.vessa.answer(result, len(indices), t.device))

    def box_mask(self, ratio: float) -> torch.Tensor:
        s = self.t.cfg.data.image_size
        return to_device(bcp_lib.box_mask(s, s, ratio, self.t.gen_host), self.t.device)

    def clean(self, label: torch.Tensor) -> torch.Tensor:
        return largest_connected_component(label, self.t.num_classes, self.t.cfg.bcp.lcc_backend)


class Trainer:
    """Holds the model, teacher, optimizer, data and RNG state of one training run.

    `link`: an AssistantLink for bcp_vessa (overrides `vessa.link`); tests pass a fake one.
    `pseudo`: the unlabeled slices are these pseudo-labeled ones (a labeling job's closed loop), not the
    dataset's unlabeled pool. With `data.val_split` empty nothing is validated (no volume's ground
    truth is read; no best.pt, latest.pt is the result).
    """

    def __init__(
        self, cfg: TrainSettings, link: AssistantLink | None = None, pseudo: PseudoLabeledSlices | None = None
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._seed_everything(cfg.seed)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.method: TrainingMethod = get_method(cfg.method)(cfg)
        method = self.method

        t0 = time.perf_counter()
        self.data: TrainingData = load_training_data(
            cfg.data.root,
            cfg.data.n_labeled,
            cfg.data.image_size,
            self.device,
            method.uses_unlabeled,
            # the assistant is asked on canonical host slices
            host_size=cfg.vessa.canonical_size if method.uses_assistant else None,
            pseudo=pseudo,
        )
        self.val: ValidationSet | None = None
        if cfg.data.val_split:
            self.val = load_validation_set(cfg.data.root, cfg.data.val_split, cfg.data.max_val_volumes)
        log.info(
            "data: %d labeled slices (%d patients), %d unlabeled slices, %d validation volumes (%.1fs)",
            self.data.num_labeled,
            len(self.data.labeled_patients),
            self.data.num_unlabeled,
            len(self.val.volumes) if self.val is not None else 0,
            time.perf_counter() - t0,
        )
        self.classes = self.data.classes
        self.num_classes = len(self.classes)

        self.model = UNet(1, self.num_classes, cfg.model.upsampling).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.teacher: nn.Module | None = method.initial_teacher(self.model)
        self.optimizer = self._make_optimizer()
        self._compiled: dict[int, tuple[nn.Module, nn.Module]] = {}

        # RNG streams: index sampling and box positions on the host, augmentation/noise on the device
        self.gen_host = torch.Generator().manual_seed(cfg.seed + 1)
        self.gen_dev = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.labeled_sampler = IndexSampler(self.data.num_labeled, cfg.seed + 3)
        self.unlabeled_sampler = IndexSampler(max(self.data.num_unlabeled, 1), cfg.seed + 4)
        self.augmenter = Augmenter(cfg.augment, self.gen_dev)

        self.phases = make_phases(method)
        self.total_steps = self.phases[-1].end
        self.step = 0
        self.best = {"pretrain": -1.0, "train": -1.0}
        self.best_step = {"pretrain": -1, "train": -1}

        self.vessa: VessaPseudoLabeler | None = None
        self.static: StaticStep | None = None
        if method.uses_assistant:
            link = link if link is not None else build_link(cfg.vessa)
            if link is None:
                log.warning(
                    "%s without an assistant link: every batch falls back to the teacher", method.name
                )
        if cfg.step.mode == "graph":
            # the graph-ready step asks the assistant through a table, not the per-step prefetcher
            self.static = StaticStep(self, link)
        elif method.uses_assistant:
            self.vessa = VessaPseudoLabeler(
                link,
                cfg.vessa,
                self.data.unlabeled_host,
                self.data.unlabeled_keys,
                self.num_classes,
                draw_indices=lambda: self.unlabeled_sampler.next(self.cfg.batch_size - self.cfg.labeled_bs),
                prompt_probs=self._prompt_probs,
                start_step=self.phases[-1].start,
            )
        self._inputs = EagerInputs(self)
        self.writer = None
        self.loss_log: list[tuple[int, str, float]] = []  # (step, phase, loss) at each log point
        self.val_log: list[tuple[int, str, float]] = []  # (step, phase, mean val Dice) at each validation

    # -- setup ------------------------------------------------------------------------------------
    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.SGD(
            self.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )

    def _net(self, module: nn.Module) -> nn.Module:
        """The module to call for training forwards: torch.compile'd when configured (CUDA)."""
        if not self.cfg.compile:
            return module
        cached = self._compiled.get(id(module))
        if cached is None or cached[0] is not module:  # a new module may reuse a freed one's id
            cached = (module, torch.compile(module))
            self._compiled[id(module)] = cached
        return cached[1]

    # -- batches ----------------------------------------------------------------------------------
    def _unlabeled_images(self, indices: list[int]) -> torch.Tensor:
        return self.data.unlabeled_images[to_device(torch.as_tensor(indices), self.device)]

    @torch.no_grad()
    def _prompt_probs(self, indices: list[int]) -> np.ndarray:
        """The teacher's softmax (B, C, S, S) on canonical unlabeled slices (eval mode): the prompt."""
        assert self.teacher is not None
        x = self._unlabeled_images(indices)
        with autocast_for(self.device, self.amp):
            probs = bcp_lib.teacher_predict(self.teacher, x, train_mode=False)
        probs = resize_images(probs.float(), self.data.unlabeled_host.shape[-2:])  # to the canonical size
        return probs.cpu().numpy()

    # -- one step: the method's loss and teacher update -------------------------------------------
    def _loss(self, phase: Phase, phase_step: int) -> dict[str, torch.Tensor]:
        return self.method.loss(self._inputs, phase.name, phase_step)

    def _after_step(self, phase: Phase, phase_step: int) -> None:
        if self.teacher is not None:
            self.method.update_teacher(self.model, self.teacher, phase.name, phase_step)

    # -- phases -----------------------------------------------------------------------------------
    def _phase_of(self, step: int) -> Phase:
        for p in self.phases:
            if p.start <= step < p.end:
                return p
        return self.phases[-1]

    # -- validation and checkpoints ---------------------------------------------------------------
    def _validate(self, phase: Phase) -> float:
        if self.val is None:  # data.val_split empty: no validation
            return -1.0
        t0 = time.perf_counter()
        summary = validate(
            self.model,
            self.val,
            self.classes,
            self.cfg.data.image_size,
            self.device,
            self.amp,
            full=self.cfg.val_metrics == "full",
        )
        dice = summary["mean_dice"]
        self.val_log.append((self.step, phase.name, float(dice)))
        if self.writer is not None:
            self.writer.add_scalar(f"val_{phase.name}/mean_dice", dice, self.step)
            for name, value in summary["per_class"].items():
                for metric, v in value.items():
                    if v is not None and math.isfinite(v):
                        self.writer.add_scalar(f"val_{phase.name}/{metric}_{name}", v, self.step)
        improved = dice > self.best[phase.name]
        if improved:
            self.best[phase.name] = dice
            self.best_step[phase.name] = self.step
            name = "best_pretrain.pt" if phase.name == "pretrain" else "best.pt"
            self._save(self.out_dir / name, full=phase.name == "pretrain")
        log.info(
            "step %d [%s] val mean Dice %.4f (best %.4f at %d)%s in %.1fs",
            self.step,
            phase.name,
            dice,
            self.best[phase.name],
            self.best_step[phase.name],
            " *" if improved else "",
            time.perf_counter() - t0,
        )
        return dice

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "gen_host": _gen_state(self.gen_host),
            "gen_dev": _gen_state(self.gen_dev),
            "python": json.dumps(random.getstate()),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _load_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        self.gen_host.set_state(state["gen_host"].cpu())
        if state["gen_dev"].numel() == _gen_state(self.gen_dev).numel():
            self.gen_dev.set_state(state["gen_dev"].cpu())
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)
        py = json.loads(state["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))

    def _save(self, path: Path, full: bool = True) -> None:
        phase = self._phase_of(max(self.step - 1, 0))
        ckpt: dict[str, Any] = {
            "format": FORMAT,
            "kind": KIND,
            "method": self.cfg.method,
            "model": self.model.state_dict(),
            "model_meta": {
                "in_channels": 1,
                "num_classes": self.num_classes,
                "image_size": self.cfg.data.image_size,
                "upsampling": self.cfg.model.upsampling,
            },
            "classes": classes_to_list(self.classes),
            "config": self.cfg.model_dump_json(),
            "step": self.step,
            "phase": phase.name,
            "phase_step": self.step - phase.start,
            "best_dice": float(self.best[phase.name]),
            "best_step": int(self.best_step[phase.name]),
        }
        if full:
            ckpt.update(
                {
                    "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                    "optimizer": self.optimizer.state_dict(),
                    "rng": self._rng_state(),
                    "sampler": {
                        "labeled": self.labeled_sampler.state_dict(),
                        "unlabeled": self.unlabeled_sampler.state_dict(),
                        "device_streams": self.static.state_dict() if self.static is not None else None,
                    },
                    "planned": self.vessa.planned_indices() if self.vessa is not None else [],
                    "best_all": {k: float(v) for k, v in self.best.items()},
                    "best_step_all": {k: int(v) for k, v in self.best_step.items()},
                    "prefetch_stats": self.vessa.summary() if self.vessa is not None else {},
                }
            )
        atomic_save(ckpt, path)
        save_resolved(self.cfg, path.parent, name=f"{path.stem}.config.yaml")

    def resume(self) -> bool:
        """Load latest.pt from out_dir if there is one. Returns whether it did."""
        path = self.out_dir / "latest.pt"
        if not path.is_file():
            log.warning("--resume: no %s, starting from scratch", path)
            return False
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt["method"] != self.cfg.method:
            raise ValueError(f"{path} was written by method {ckpt['method']!r}, not {self.cfg.method!r}")
        self.model.load_state_dict(ckpt["model"])
        if ckpt.get("teacher") is not None:
            if self.teacher is None:
                self.teacher = make_teacher(self.model)
            self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self._load_rng_state(ckpt["rng"])
        self.labeled_sampler.load_state_dict(ckpt["sampler"]["labeled"])
        self.unlabeled_sampler.load_state_dict(ckpt["sampler"]["unlabeled"])
        if self.static is not None and ckpt["sampler"].get("device_streams") is not None:
            self.static.load_state_dict(ckpt["sampler"]["device_streams"])
        self.best = dict(ckpt["best_all"])
        self.best_step = dict(ckpt["best_step_all"])
        self.step = int(ckpt["step"])
        if self.vessa is not None:
            # requests that were in flight are gone with the old process: the batches are kept, the
            # requests are resubmitted (with the restored teacher's prompts) when planned again
            self.vessa.restore_plan(ckpt.get("planned", []))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[Phase, dict[str, torch.Tensor], float]:
        """One optimisation step at `self.step` (then incremented). Returns (phase, losses, lr); the
        losses stay on the device (reading them syncs, so the loop does it only every log_every)."""
        cfg = self.cfg
        phase = self._phase_of(self.step)
        phase_step = self.step - phase.start
        if phase_step == 0:
            self.method.start_phase(self, phase.name)
        lr = cfg.optim.lr
        if cfg.optim.schedule == "poly":
            lr = poly_lr(cfg.optim.lr, phase_step, phase.length, cfg.optim.poly_power)
        self.method.before_step(self, phase.name, phase_step)
        if self.static is not None:
            losses = self.static.run(phase.name, phase_step, lr)
            self.step += 1
            return phase, losses, lr
        if self.teacher is not None:
            self.teacher.train()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        losses = self._loss(phase, phase_step)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self._after_step(phase, phase_step)
        self.step += 1
        return phase, losses, lr

    def fit(self) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        cfg = self.cfg
        save_resolved(cfg, self.out_dir)
        self.writer = SummaryWriter(str(self.out_dir / "tb"))
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not cfg.progress, dynamic_ncols=True, unit="it"
        )
        self.model.train()
        t_start = time.perf_counter()
        steps_run = 0
        try:
            while self.step < self.total_steps:
                phase, losses, lr = self.train_step()
                steps_run += 1
                bar.update(1)

                done_phase = self.step == phase.end
                if self.step % cfg.log_every == 0 or done_phase:
                    scalars = {k: float(v.detach()) for k, v in losses.items()}
                    for k, v in scalars.items():
                        self.writer.add_scalar(f"{phase.name}/{k}", v, self.step)
                    self.writer.add_scalar(f"{phase.name}/lr", lr, self.step)
                    if self.vessa is not None and phase.name == "train":
                        for k, v in self.vessa.summary().items():
                            self.writer.add_scalar(f"vessa/{k}", v, self.step)
                    bar.set_postfix(phase=phase.name, loss=f"{scalars['loss']:.4f}", lr=f"{lr:.2e}")
                    self.loss_log.append((self.step, phase.name, scalars["loss"]))
                if (self.step - phase.start) % cfg.val_every == 0 or done_phase:
                    self._validate(phase)
                    self.model.train()
                if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                    self._save(self.out_dir / "latest.pt")
        finally:
            bar.close()
            if self.vessa is not None:
                summary = self.vessa.summary()
                log.info("assistant: %s", json.dumps(summary))
                self.vessa.close()
            if self.static is not None and self.static.link is not None:
                self.static.link.close()
            self.writer.flush()
        elapsed = time.perf_counter() - t_start
        result: dict[str, Any] = {
            "out_dir": str(self.out_dir),
            "step": self.step,
            "best_dice": self.best["train"],
            "best_step": self.best_step["train"],
            "best_pretrain_dice": self.best["pretrain"] if len(self.phases) > 1 else None,
            "iterations_per_s": steps_run / elapsed if elapsed > 0 else 0.0,
            "train_loss": [list(x) for x in self.loss_log],
            "val_dice": [list(x) for x in self.val_log],
        }
        if self.vessa is not None:
            result["assistant"] = self.vessa.summary()
        if self.static is not None:
            result["graph_step"] = self.static.summary()
        if cfg.final_eval and self.val is not None and (self.out_dir / "best.pt").is_file():
            from student_trainer.evaluate import evaluate_checkpoint

            report = evaluate_checkpoint(self.out_dir / "best.pt", self.val, self.device, amp=self.amp)
            (self.out_dir / "best_val_metrics.json").write_text(json.dumps(report, indent=2))
            result["best_val_summary"] = report["summary"]
        (self.out_dir / "result.json").write_text(json.dumps(result, indent=2))
        self.writer.close()
        return result


def train(cfg: TrainSettings, resume: bool = False, link: AssistantLink | None = None) -> dict[str, Any]:
    """Train per `cfg`; returns a summary (best Dice, iterations/s, assistant counters, ...)."""
    trainer = Trainer(cfg, link=link)
    if resume:
        trainer.resume()
    return trainer.fit()
