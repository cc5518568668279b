"""Settings of `vessa train`: one class, resolved from CLI flags > `VESSA_*` env > YAML > defaults.

Nested keys use `__` in the environment (`VESSA_DATA__ROOT=/data/acdc`, `VESSA_VESSA__PREFETCH=8`) and
dots on the command line (`--set data.root=/data/acdc`). Relative paths are relative to the working
directory (the repository root, where `../shared/data/acdc` is the shared ACDC copy).

Defaults are the published recipes (SSL4MIS ACDC 2D scripts, BCP `ACDC_BCP_train.py`); the YAML files in
`configs/train/` only say what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.config import VessaSettings
from student_trainer.fusion import FusionMode


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Section):
    root: Path = Path("../shared/data/acdc")
    n_labeled: int = Field(3, ge=1, description="labeled patients: the first N of the protocol order")
    image_size: int = Field(256, description="training/inference resolution (multiple of 16)")
    val_split: str = Field("val", description="validation volumes' split; empty: no validation (the loop of a labeling job)")
    max_val_volumes: int | None = Field(None, description="validate on the first N volumes only")

    @model_validator(mode="after")
    def _check(self) -> DataSettings:
        if self.image_size % 16:
            raise ValueError("data.image_size must be a multiple of 16 (four 2× poolings)")
        return self


class ModelSettings(_Section):
    upsampling: Literal["bilinear", "transpose"] = Field(
        "bilinear", description="UNet decoder upsampling; bilinear is what SSL4MIS/BCP's ACDC runs used"
    )


class OptimSettings(_Section):
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["poly", "constant"] = Field(
        "poly", description="poly: lr*(1-i/N)^power per phase (SSL4MIS); constant: BCP's released code"
    )
    poly_power: float = 0.9


class AugmentSettings(_Section):
    """SSL4MIS `RandomGenerator`: with p_rot_flip a random rot90 + flip, else with p_rotate a random
    rotation in ±max_angle degrees (nearest for labels), else nothing."""

    p_rot_flip: float = 0.5
    p_rotate: float = 0.5
    max_angle: float = 20.0


class MeanTeacherSettings(_Section):
    ema_decay: float = 0.99
    consistency: float = 0.1
    consistency_rampup: float = 200.0
    rampup_every: int = Field(150, description="ramp-up 'epoch' = iteration // rampup_every (SSL4MIS)")
    consistency_start: int = Field(1000, description="no consistency loss before this iteration (SSL4MIS)")
    noise_std: float = 0.1
    noise_clip: float = 0.2


class BCPSettings(_Section):
    pretrain_iters: int = Field(10000, ge=0, description="labeled-only copy-paste pre-training iterations")
    u_weight: float = 0.5
    ema_decay: float = 0.99
    box_ratio: float = Field(2 / 3, gt=0, lt=1, description="side of the zeroed box / image side")
    lcc: bool = Field(True, description="clean teacher pseudo-labels by largest connected component")
    lcc_backend: Literal["auto", "scipy", "torch"] = Field(
        "auto", description="auto: scipy for CPU tensors, the on-device algorithm for CUDA tensors"
    )
    teacher_train_mode: bool = Field(
        True, description="teacher forward in train mode (dropout, batch BN), as BCP's code does"
    )
    init_from: Literal["best", "last"] = Field(
        "best", description="self-training starts from the best (by val Dice) or last pre-trained model"
    )


class FusionSettings(_Section):
    mode: FusionMode = "agree_confidence"
    tau: float = Field(0.5, description="assistant per-class confidence needed to override the teacher")
    teacher_tau: float = Field(0.9, description="teacher max-prob below which it may be overridden")
    w_dis: float = Field(0.5, ge=0, description="loss weight of pixels where teacher and assistant disagree")
    background_overrides: bool = Field(
        True, description="whether the assistant's background may override a teacher's organ label"
    )
    lcc_after: bool = Field(False, description="largest-connected-component cleaning of the fused label too")


class AssistantLinkSettings(_Section):
    """bcp_vessa's link to the assistant (YAML key `vessa`)."""

    link: str = Field(
        "",
        description="factory 'module:callable' returning an AssistantLink, called with link_kwargs; "
        "empty: no assistant (every batch falls back to the teacher)",
    )
    link_kwargs: dict[str, Any] = Field(default_factory=dict)
    warmup_iters: int = Field(1000, ge=0, description="self-training iterations with templates-only prompts")
    prefetch: int = Field(4, ge=0, description="batches in flight ahead of the training step")
    timeout_s: float = Field(5.0, ge=0, description="wait at most this long for a step's answer")
    log_every: int = Field(100, ge=1, description="log every N-th fallback")
    canonical_size: int = Field(
        256,
        description="side of the canonical slices sent to the assistant (shared.wire.canonical.CANONICAL_SIZE)",
    )
    fusion: FusionSettings = FusionSettings()


class StepSettings(_Section):
    """How a training step runs (`student_trainer.static_step`). eager: the reference loop; graph: the
    graph-ready step (draws on the device, static shapes, no host sync; captured as one CUDA graph per
    phase on CUDA when cuda_graph is on, the same code run eagerly elsewhere). graph runs the methods
    marked `graph_ready` (`student_trainer.methods`): all but mean_teacher."""

    mode: Literal["eager", "graph"] = "eager"
    cuda_graph: bool = Field(True, description="capture the graph-ready step on CUDA (ignored elsewhere)")
    graph_warmup: int = Field(3, ge=1, description="eager steps per phase before the capture")
    lcc_rounds: int = Field(
        8, ge=1, description="connected-component rounds of the graph-ready step (ACDC-like maps need 4)"
    )
    assistant_refresh_every: int = Field(
        1000, ge=1, description="bcp_vessa graph step: re-ask the assistant with teacher prompts every N"
    )
    assistant_chunk: int = Field(64, ge=1, description="slices per request when filling the assistant table")
    assistant_table_slices: int | None = Field(
        None, ge=1, description="ask only for the first N unlabeled slices (None: all; CPU smoke runs)"
    )
    assistant_timeout_s: float = Field(600.0, gt=0, description="wait at most this long for a table fill")


class TrainSettings(VessaSettings):
    """`vessa train` settings. See `configs/train/*.yaml` for the recipes."""

    method: str = Field("bcp", description="the training method, by name (student_trainer.methods.METHODS)")
    seed: int = 1337
    out_dir: Path = Path("runs/train")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    batch_size: int = Field(24, ge=2)
    labeled_bs: int = Field(12, ge=1, description="labeled part of a semi-supervised batch")
    max_iters: int = Field(30000, ge=1, description="(self-)training iterations; BCP adds pre-training")
    val_every: int = Field(200, ge=1)
    save_every: int = Field(1000, ge=1, description="write latest.pt every N iterations")
    log_every: int = Field(20, ge=1, description="TensorBoard scalars and progress-bar loss every N")
    val_metrics: Literal["dice", "full"] = Field(
        "dice",
        description="metrics during training: dice (fast, best-checkpoint criterion) or full "
        "(Dice, Jaccard, HD95, ASD via shared.metrics); the best checkpoint always gets full metrics",
    )
    final_eval: bool = Field(True, description="full metrics of best.pt on the validation volumes at the end")
    amp: bool = Field(True, description="bf16 autocast (CUDA only)")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the student (CUDA; off on CPU)")
    num_threads: int | None = Field(None, description="torch CPU threads (None: torch's default)")
    deterministic: bool = False
    progress: bool = True

    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    optim: OptimSettings = OptimSettings()
    augment: AugmentSettings = AugmentSettings()
    mean_teacher: MeanTeacherSettings = MeanTeacherSettings()
    bcp: BCPSettings = BCPSettings()
    vessa: AssistantLinkSettings = AssistantLinkSettings()
    step: StepSettings = StepSettings()

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from student_trainer.methods import get_method  # here: the methods import these settings

        get_method(name)
        return name

    @model_validator(mode="after")
    def _check_method(self) -> TrainSettings:
        from student_trainer.methods import get_method, graph_ready_methods

        method = get_method(self.method)
        if self.step.mode == "graph" and not method.graph_ready:
            raise ValueError(
                f"step.mode=graph supports {', '.join(graph_ready_methods())}, not {self.method}"
            )
        method.check_settings(self)
        return self


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> {"a": {"b": "1"}, "c": "x"} (pydantic converts the strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
    return out
