"""Exponential moving average (mean) teachers.

Two update rules, as the two reference codes do it:
- `update_ema_params` (SSL4MIS mean teacher): parameters only, decay min(1 - 1/(step+1), alpha) so early
  steps use the true average; the teacher's BatchNorm statistics come from its own forward passes.
- `update_ema_state` (BCP `update_model_ema`): the whole state dict, parameters and BatchNorm running
  statistics alike, with a fixed alpha. Integer buffers (num_batches_tracked) are copied.
Both use fused foreach ops (one kernel launch per group on a GPU, not one per tensor).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A detached copy of `student` whose parameters take no gradient."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_ema_params(teacher: nn.Module, student: nn.Module, alpha: float, global_step: int) -> float:
    """SSL4MIS `update_ema_variables`: teacher = a*teacher + (1-a)*student over parameters, with
    a = min(1 - 1/(global_step + 1), alpha). Returns the a used."""
    a = min(1.0 - 1.0 / (global_step + 1), alpha)
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - a)
    return a


@torch.no_grad()
def update_ema_state(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """BCP `update_model_ema`: every floating tensor of the state dict (parameters and BN running
    statistics) becomes alpha*teacher + (1-alpha)*student; integer buffers are copied."""
    t_float, s_float, t_int, s_int = _state_lists(teacher, student)
    torch._foreach_lerp_(t_float, s_float, 1.0 - alpha)
    if t_int:
        torch._foreach_copy_(t_int, s_int)


_STATE_CACHE: dict[str, object] = {}


def _state_lists(teacher: nn.Module, student: nn.Module) -> tuple[list, list, list, list]:
    """The state tensors of both models as (teacher float, student float, teacher int, student int)
    lists, built once per pair of modules: walking state_dict() every step costs more than the update.
    Stays valid because load_state_dict copies into the same tensors; weak references make sure a new
    pair of modules (even one reusing freed ids) rebuilds the lists."""
    t_ref, s_ref = _STATE_CACHE.get("teacher"), _STATE_CACHE.get("student")
    if t_ref is not None and s_ref is not None and t_ref() is teacher and s_ref() is student:
        return _STATE_CACHE["lists"]  # type: ignore[return-value]
    t_state = teacher.state_dict(keep_vars=True)
    s_state = student.state_dict(keep_vars=True)
    lists: tuple[list, list, list, list] = ([], [], [], [])
    for name, t in t_state.items():
        s = s_state[name]
        i = 0 if t.is_floating_point() else 2
        lists[i].append(t.data)
        lists[i + 1].append(s.data)
    _STATE_CACHE.update(teacher=weakref.ref(teacher), student=weakref.ref(student), lists=lists)
    return lists
