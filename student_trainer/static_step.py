"""The graph-ready training step (`step.mode: graph`): one step as a fixed sequence of device kernels.

A CUDA graph replays recorded kernels; it cannot wait for the host, branch on device values, or draw
on the host. So this step, for supervised, BCP pre-training, BCP self-training and BCP + VESSA:

- draws everything on the device, from the trainer's device generator: batch indices
  (`DeviceIndexStream`: the same successive-permutation stream as `data.IndexSampler`, cut by a device
  cursor), BCP's copy-paste box, the augmentation parameters;
- has static shapes and no host sync: the connected-component cleaning runs a fixed number of rounds
  (`step.lcc_rounds`) and counts, on the device, the steps where that did not suffice; SGD is a foreach
  update whose learning rate is a device scalar refreshed before each step (torch.optim.SGD's math,
  dampening 0, no Nesterov, with momentum buffers that start at zero: the same first step as
  torch's `buf = grad`);
- for BCP + VESSA, reads the assistant's answers from a table on the device (`AssistantTable`: label
  map and per-class confidence of every unlabeled slice in its canonical pose), filled through the
  usual `AssistantLink` before self-training starts (templates-only prompts) and refreshed outside the
  step every `step.assistant_refresh_every` iterations once `vessa.warmup_iters` have passed (the
  teacher's prompts on every unlabeled slice). Its answers are then at most that many steps stale,
  where the eager path's are at most `vessa.prefetch` steps stale.

On CUDA with `step.cuda_graph` the whole step (draws, forwards, losses, backward, SGD, EMA) is
captured once per phase after a few eager warm-up steps and replayed; elsewhere the same code runs
eagerly. `StaticStep.run(static=False)` is the eager reference: the same draws, with the trainer's
torch.optim.SGD, the converging cleaning (`bcp.lcc_backend`) and host-side scalars, so a test can hold
the two to the same losses.

The losses and teacher updates are the training method's (`student_trainer.methods`), the same code
the eager step calls; this module supplies their inputs (`DeviceInputs`) and runs the update.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
import torch

from shared.components import largest_cc_fixed, largest_connected_component
from student_trainer import bcp as bcp_lib
from student_trainer.assistant_link import AssistantLink, PseudoLabelRequest
from student_trainer.fusion import AssistantAnswer
from student_trainer.methods import StepInputs, UnlabeledDraw, graph_ready_methods

log = logging.getLogger(__name__)


class DeviceIndexStream:
    """An endless shuffled stream over range(n) on the device: a buffer of successive random
    permutations (epochs, drawn with `generator`), read k at a time through a device cursor, so taking
    a batch is two kernels and no host work. The host keeps the same cursor as a Python int (every take
    is k long), so it refills the buffer, between steps, before it runs out: the unread tail is kept in
    front, as `IndexSampler` lets a batch straddle two epochs."""

    def __init__(self, n: int, k: int, generator: torch.Generator, device: torch.device, epochs: int = 0):
        if n <= 0 or k <= 0:
            raise ValueError("DeviceIndexStream needs n >= 1 and k >= 1")
        self.n, self.k, self.gen, self.device = n, k, generator, device
        self.epochs = epochs or max(2, -(-64 * k // n))  # about 64 takes per refill
        self.buf = torch.zeros(self.epochs * n + k, dtype=torch.int64, device=device)
        self.offsets = torch.arange(k, device=device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=device)
        self.pos = 0  # the host's copy of the cursor
        self.valid = 0
        self.refill()

    def _perms(self) -> torch.Tensor:
        return torch.cat(
            [torch.randperm(self.n, generator=self.gen, device=self.gen.device) for _ in range(self.epochs)]
        ).to(self.device)

    def refill(self) -> None:
        """Outside a captured step: the unread tail, then `epochs` fresh permutations; cursor to 0."""
        tail = self.buf[self.pos : self.valid].clone()
        fresh = torch.cat([tail, self._perms()])
        self.buf[: fresh.numel()].copy_(fresh)
        self.valid = int(fresh.numel())
        self.pos = 0
        self.cursor.zero_()

    def before_step(self) -> None:
        """Host side, before each step: make sure the next take is inside the buffer."""
        if self.pos + self.k > self.valid:
            self.refill()
        self.pos += self.k

    def take(self) -> torch.Tensor:
        """Device side (inside the step): the next k indices, (k,) int64; advances the device cursor."""
        idx = self.buf.index_select(0, self.cursor + self.offsets)
        self.cursor.add_(self.k)
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"buf": self.buf.cpu().clone(), "pos": self.pos, "valid": self.valid, "n": self.n, "k": self.k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n or int(state["k"]) != self.k:
            raise ValueError("index stream state is for another dataset or batch size")
        self.buf.copy_(state["buf"].to(self.device))
        self.pos, self.valid = int(state["pos"]), int(state["valid"])
        self.cursor.fill_(self.pos)


class AssistantTable:
    """The assistant's answer for every unlabeled slice, on the device: labels (N, S, S) uint8 in the
    canonical pose, confidence (N, C) float32, available (N,) bool (False: never answered, the teacher's
    label stands). Filled through an `AssistantLink` in chunks; tensors are updated in place, so a
    captured step keeps reading the current answers."""

    def __init__(self, num: int, size: tuple[int, int], num_classes: int, device: torch.device) -> None:
        self.labels = torch.zeros((num, *size), dtype=torch.uint8, device=device)
        self.confidence = torch.zeros((num, num_classes), dtype=torch.float32, device=device)
        self.available = torch.zeros(num, dtype=torch.bool, device=device)
        self.builds = 0
        self.answered = 0
        self.seconds = 0.0

    def fill(
        self,
        link: AssistantLink,
        images: np.ndarray,
        keys: list[str],
        prompts: Any | None,
        chunk: int,
        timeout_s: float,
    ) -> int:
        """Ask for every slice (`prompts(indices)` -> (B, C, S, S) float32, or None: templates only);
        all chunks are submitted first, then collected. Returns how many slices got an answer."""
        t0 = time.perf_counter()
        pending = []
        for start in range(0, images.shape[0], chunk):
            idx = list(range(start, min(start + chunk, images.shape[0])))
            probs = None if prompts is None else np.ascontiguousarray(prompts(idx), np.float32)
            req = PseudoLabelRequest(
                keys=[keys[i] for i in idx],
                images=np.ascontiguousarray(images[idx], dtype=np.float32),
                student_probs=probs,
            )
            pending.append((idx, link.submit(req)))
        answered = 0
        deadline = time.monotonic() + timeout_s
        for idx, rid in pending:
            res = link.result(rid, max(0.0, deadline - time.monotonic()))
            if res is None:
                continue
            rows = torch.as_tensor(idx, device=self.labels.device)
            self.labels.index_copy_(
                0, rows, torch.from_numpy(np.asarray(res.labels, np.uint8)).to(rows.device)
            )
            conf = torch.from_numpy(np.asarray(res.confidence, np.float32)).to(rows.device)
            self.confidence.index_copy_(0, rows, conf)
            self.available.index_fill_(0, rows, True)
            answered += len(idx)
        self.builds += 1
        self.answered = answered
        self.seconds += time.perf_counter() - t0
        return answered


@torch.no_grad()
def sgd_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    lr: torch.Tensor,
    momentum: float,
    weight_decay: float,
) -> None:
    """torch.optim.SGD (dampening 0, no Nesterov) as foreach kernels with a device learning rate:
    g = grad + wd * p; buf = momentum * buf + g; p -= lr * buf. Zero-initialised buffers give torch's
    first step (buf = g) without a branch."""
    g = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, g)
    torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))


class DeviceInputs(StepInputs):
    """A training method's inputs in the graph-ready step: indices from the device index streams,
    BCP's box and the augmentations from the device generator, the assistant's answers from the table,
    and (static=True) the fixed-round connected-component cleaning, whose misses are counted on the
    device; static=False is the eager reference's converging cleaning."""

    def __init__(self, step: StaticStep, static: bool) -> None:
        t = step.t
        super().__init__(t.data, t.augmenter, t.gen_dev)
        self.step = step
        self.static = static

    @property
    def student(self) -> torch.nn.Module:
        return self.step.t.model

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self.step.t.teacher

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        t = self.step.t
        if t.amp and t.device.type == "cuda":  # no autocast weight cache: it does not survive capture
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def labeled_indices(self, n: int) -> torch.Tensor:
        stream = self.step.labeled
        assert n == stream.k, "the labeled stream was sized by the method's labeled_per_step()"
        return stream.take()

    def unlabeled(self, n: int) -> UnlabeledDraw:
        stream = self.step.unlabeled
        assert stream is not None and n == stream.k, "the unlabeled stream was sized by the method"
        idx = stream.take()
        table = self.step.table
        if table is None:
            return UnlabeledDraw(idx)
        answer = AssistantAnswer(
            labels=table.labels.index_select(0, idx),
            confidence=table.confidence.index_select(0, idx),
            available=table.available.index_select(0, idx),
        )
        return UnlabeledDraw(idx, answer)

    def box_mask(self, ratio: float) -> torch.Tensor:
        t = self.step.t
        s = t.cfg.data.image_size
        return bcp_lib.box_mask(s, s, ratio, t.gen_dev, t.device)

    def clean(self, label: torch.Tensor) -> torch.Tensor:
        t = self.step.t
        if not self.static:
            return largest_connected_component(label, t.num_classes, t.cfg.bcp.lcc_backend)
        out, converged = largest_cc_fixed(label, t.num_classes, t.cfg.step.lcc_rounds)
        self.step.lcc_unconverged.add_((~converged).long())
        return out


class StaticStep:
    """The graph-ready step for one `Trainer` (see the module docstring). Owns the device index streams,
    the device learning rate, the momentum buffers (shared with the trainer's torch SGD state, so
    checkpoints are unchanged), the assistant table and, on CUDA, one captured graph per phase."""

    def __init__(self, trainer: Any, link: AssistantLink | None = None) -> None:
        self.t = trainer
        cfg = trainer.cfg
        method = trainer.method
        if not method.graph_ready:
            raise ValueError(f"step.mode=graph supports {graph_ready_methods()}, not {cfg.method!r}")
        dev = trainer.device
        gen = trainer.gen_dev
        self.labeled = DeviceIndexStream(trainer.data.num_labeled, method.labeled_per_step(), gen, dev)
        self.unlabeled = (
            DeviceIndexStream(max(trainer.data.num_unlabeled, 1), method.unlabeled_per_step(), gen, dev)
            if method.uses_unlabeled
            else None
        )
        self.lr = torch.full((), cfg.optim.lr, dtype=torch.float32, device=dev)
        self.lcc_unconverged = torch.zeros((), dtype=torch.int64, device=dev)
        self.link = link
        self.table: AssistantTable | None = None
        if method.uses_assistant:
            s = trainer.data.unlabeled_host.shape[-2:]
            self.table = AssistantTable(
                max(trainer.data.num_unlabeled, 1), (int(s[0]), int(s[1])), trainer.num_classes, dev
            )
        self.capture = bool(cfg.step.cuda_graph) and dev.type == "cuda"
        self.graphs: dict[str, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.eager_steps: dict[str, int] = {}
        self.last_refresh = -1
        self.eager_reference = False  # tests: run() defaults to the eager reference
        # the method's inputs, by `static`: fixed-round cleaning (graph-ready) or converging (reference)
        self.inputs = {True: DeviceInputs(self, static=True), False: DeviceInputs(self, static=False)}

    # -- pieces ---------------------------------------------------------------------------------------
    def _momentum_buffers(self) -> list[torch.Tensor]:
        """The torch SGD state's momentum buffers, created as zeros where missing (before the first
        step, or after a load that had none), so both paths update the same tensors."""
        opt = self.t.optimizer
        bufs = []
        for p in self._params():
            st = opt.state[p]
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        return bufs

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.t.optimizer.param_groups for p in g["params"]]

    def _body(self, phase: str, phase_step: int, static: bool, lr: float) -> dict[str, torch.Tensor]:
        """Losses, backward, update, EMA: the part a graph captures (with static=True)."""
        t, o = self.t, self.t.cfg.optim
        if static:
            for p in self._params():
                p.grad = None  # backward writes fresh gradients (under capture: from the graph's pool)
        losses = t.method.loss(self.inputs[static], phase, phase_step)
        if static:
            losses["loss"].backward()
            params = self._params()
            sgd_foreach(
                params,
                [p.grad for p in params],
                self._momentum_buffers(),
                self.lr,
                o.momentum,
                o.weight_decay,
            )
        else:
            t.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            for g in t.optimizer.param_groups:
                g["lr"] = lr
            t.optimizer.step()
        t.method.update_teacher(t.model, t.teacher, phase, phase_step)
        return losses

    # -- the assistant table ------------------------------------------------------------------------
    def fill_table(self, phase_step: int) -> None:
        """Before self-training (templates only), then every `assistant_refresh_every` steps past
        `vessa.warmup_iters` (teacher prompts). Outside the captured step (the `bcp_vessa` method calls
        it before each self-training step); replaces values in place."""
        t = self.t
        if self.table is None or self.link is None or t.data.num_unlabeled == 0:
            return
        cfg = t.cfg
        every = cfg.step.assistant_refresh_every
        first = self.table.builds == 0
        feedback = phase_step >= cfg.vessa.warmup_iters
        due = (
            feedback
            and (phase_step - cfg.vessa.warmup_iters) % every == 0
            and phase_step != self.last_refresh
        )
        if not (first or due):
            return
        prompts = t._prompt_probs if feedback else None
        limit = cfg.step.assistant_table_slices or t.data.num_unlabeled
        n = self.table.fill(
            self.link,
            t.data.unlabeled_host[:limit],
            t.data.unlabeled_keys[:limit],
            prompts,
            cfg.step.assistant_chunk,
            cfg.step.assistant_timeout_s,
        )
        self.last_refresh = phase_step
        log.info(
            "assistant table %s at self-training step %d: %d/%d slices answered (%.1fs in all)",
            "refreshed with teacher prompts" if feedback else "built (templates only)",
            phase_step,
            n,
            t.data.num_unlabeled,
            self.table.seconds,
        )

    # -- one step --------------------------------------------------------------------------------------
    def run(
        self, phase: str, phase_step: int, lr: float, static: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """One step of `phase` at learning rate `lr`. static=False: the eager reference (see module);
        None: the graph-ready step unless `eager_reference` is set. The method's `before_step` hook has
        run (the trainer calls it)."""
        t = self.t
        static = (not self.eager_reference) if static is None else static
        self.labeled.before_step()
        if phase == "train" and self.unlabeled is not None:
            self.unlabeled.before_step()
        self.lr.fill_(lr)
        if t.teacher is not None:
            t.teacher.train()
        t.model.train()
        if not (static and self.capture):
            return self._body(phase, phase_step, static, lr)
        if phase in self.graphs:
            graph, out = self.graphs[phase]
            graph.replay()
            return out
        # a few eager steps first (cuDNN autotuning, autograd's buffers, on a side stream as the CUDA
        # graphs notes ask), then capture the next one and replay it from then on
        warm = self.eager_steps.get(phase, 0)
        if warm < self.t.cfg.step.graph_warmup:
            self.eager_steps[phase] = warm + 1
            side = torch.cuda.Stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                out = self._body(phase, phase_step, static, lr)
            torch.cuda.current_stream(t.device).wait_stream(side)
            return out
        return self._capture(phase, phase_step, lr)

    def _capture(self, phase: str, phase_step: int, lr: float) -> dict[str, torch.Tensor]:
        t = self.t
        graph = torch.cuda.CUDAGraph()
        register = getattr(graph, "register_generator_state", None)
        if register is not None:
            register(t.gen_dev)  # draws advance the device generator on every replay
        # capture records kernels without running them (the cursors do not move); the replay below is
        # this step itself
        with torch.cuda.graph(graph):
            out = self._body(phase, phase_step, True, lr)
        self.graphs[phase] = (graph, out)
        log.info("captured the %s step as a CUDA graph", phase)
        graph.replay()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "labeled": self.labeled.state_dict(),
            "unlabeled": self.unlabeled.state_dict() if self.unlabeled is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labeled.load_state_dict(state["labeled"])
        if self.unlabeled is not None and state.get("unlabeled") is not None:
            self.unlabeled.load_state_dict(state["unlabeled"])

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {
            "lcc_unconverged_steps": float(self.lcc_unconverged),
            "graphs": float(len(self.graphs)),
        }
        if self.table is not None:
            out.update(
                table_builds=float(self.table.builds),
                table_answered=float(self.table.answered),
                table_seconds=self.table.seconds,
            )
        return out
