"""The training methods by their config name (`method:` in configs/train/*.yaml, `vessa train --method`)."""

from __future__ import annotations

from student_trainer.methods.base import TrainingMethod
from student_trainer.methods.bcp import BCPMethod
from student_trainer.methods.bcp_vessa import BCPVessaMethod
from student_trainer.methods.mean_teacher import MeanTeacherMethod
from student_trainer.methods.pseudo_labels import PseudoLabelMethod
from student_trainer.methods.supervised import SupervisedMethod

METHODS: dict[str, type[TrainingMethod]] = {
    m.name: m for m in (SupervisedMethod, MeanTeacherMethod, BCPMethod, BCPVessaMethod, PseudoLabelMethod)
}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def graph_ready_methods() -> tuple[str, ...]:
    """The methods the graph-ready step (`step.mode: graph`) can run."""
    return tuple(name for name, m in METHODS.items() if m.graph_ready)


def get_method(name: str) -> type[TrainingMethod]:
    """The method class for a config name; ValueError for an unknown one."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; expected one of {', '.join(METHODS)}") from None
