"""Stage-2 training methods as strategies (`base.TrainingMethod`), one module per method, looked up by
their config name (`registry.get_method`)."""

from student_trainer.methods.base import StepInputs, TrainingMethod, UnlabeledDraw
from student_trainer.methods.registry import METHODS, get_method, graph_ready_methods, method_names

__all__ = [
    "METHODS",
    "StepInputs",
    "TrainingMethod",
    "UnlabeledDraw",
    "get_method",
    "graph_ready_methods",
    "method_names",
]
