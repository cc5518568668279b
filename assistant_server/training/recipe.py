"""`vessa assistant recipe`: the assistant from a dataset in one command — template bank, then Stage-1.

    OUT/bank/               the template bank of the first `labeled` patients (vessa bank build)
    OUT/assistant.pt        the Stage-1 checkpoint, with the inference options it is served with
    OUT/recipe.resolved.yaml
                            this recipe as resolved (flags, env, YAML), beside Stage-1's own config
  with a `self_train` section, also:
    OUT/teacher.pt          Stage-1 on the labeled bank alone (the teacher)
    OUT/pseudo_bank/        the teacher's confident answers on unlabeled volumes (pseudo_bank.py)
    OUT/assistant.pt        Stage-1 again, with `p_pseudo` of its steps' queries from that bank

A rerun reuses a bank already at OUT/bank when it was built from the same data, labeled count and
encoder, and resumes Stage-1 from its latest checkpoint. The recipe names no dataset's classes or sizes:
the class table comes from the dataset, and every choice that depends on a class's shape is read off
the bank (shared/components.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from shared.config import VessaSettings, save_resolved

if TYPE_CHECKING:
    from assistant_server.training.stage1 import Stage1Settings


class SelfTrainSettings(BaseModel):
    """The recipe's self-training round (PseudoBankSettings and Stage1Settings keys of the same names)."""

    model_config = ConfigDict(extra="forbid")
    patients: int = Field(20, ge=1)
    keep: float = Field(0.5, gt=0.0, le=1.0)
    holdout_patients: int = Field(0, ge=0)
    p_pseudo: float = Field(0.5, gt=0.0, le=1.0)
    embed_store: Path | None = None  # unlabeled slices' embeddings, kept for the next round or rerun


class RecipeSettings(VessaSettings):
    """`vessa assistant recipe` settings: YAML keys (configs/assistant/*.yaml), `VESSA_` env, flags."""

    data: Path = Field(description="dataset directory (SSL4MIS HDF5, MSD NIfTI or prepared cache)")
    labeled: int = Field(ge=1, description="labeled patients: the first N of the protocol order")
    out: Path = Field(description="recipe directory: bank/, assistant.pt and their configs")
    encoder: str = "litemedsam"
    device: str | None = None
    bank_batch_size: int = Field(8, ge=1)
    bank_cpu_bf16: bool = False  # the bank's embeddings in bf16 on the CPU (queries are fp32 by default)
    train: dict[str, Any] = Field(default_factory=dict, description="Stage1Settings keys (steps, p_self, …)")
    self_train: SelfTrainSettings | None = Field(None, description="teacher → pseudo-labeled bank → student")


def _bank_stamp(s: RecipeSettings) -> dict:
    return {"data": str(Path(s.data).resolve()), "labeled": s.labeled, "encoder": s.encoder}


def run_recipe(s: RecipeSettings) -> Path:
    """Build (or reuse) the bank and train (or resume) Stage-1; returns the checkpoint path."""
    from assistant_server.bank_builder import build_bank
    from assistant_server.training.stage1 import Stage1Settings, train_stage1

    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(s, out, name="recipe.resolved.yaml")
    # Stage-1's settings are validated before the (slow) bank build, so a typo fails at once.
    reserved = {"bank", "out", "encoder"}
    if s.self_train:
        reserved |= {"pseudo_bank", "p_pseudo"}  # the self-training round sets them for the student
    if reserved & set(s.train):
        raise ValueError(
            f"train: {sorted(reserved & set(s.train))} are set by the recipe itself; remove them"
        )
    stage1 = Stage1Settings(
        bank=out / "bank",
        out=out / ("teacher.pt" if s.self_train else "assistant.pt"),
        encoder=s.encoder,
        **({"device": s.device} if s.device else {}),
        **{"resume": True, **s.train},
    )
    bank_dir = out / "bank"
    stamp_path = out / "bank.stamp.json"
    stamp = _bank_stamp(s)
    if (bank_dir / "manifest.json").is_file():
        if not stamp_path.is_file() or json.loads(stamp_path.read_text()) != stamp:
            raise ValueError(
                f"{bank_dir} exists but was not built by this recipe's data/labeled/encoder ({stamp}): "
                "remove it or choose another --out"
            )
        print(f"bank: reusing {bank_dir}")
    else:
        build_bank(
            s.data,
            s.labeled,
            bank_dir,
            encoder=s.encoder,
            device=s.device,
            batch_size=s.bank_batch_size,
            cpu_bf16=s.bank_cpu_bf16,
            engine=stage1.engine,
        )
        stamp_path.write_text(json.dumps(stamp))
    path = train_stage1(stage1)
    if s.self_train is None:
        return path
    return _self_train(s, stage1, path)


def _self_train(s: RecipeSettings, teacher: Stage1Settings, teacher_ckpt: Path) -> Path:
    """The teacher labels unlabeled volumes; Stage-1 is trained again with those as extra queries."""
    from assistant_server.training.pseudo_bank import PseudoBankSettings, build_pseudo_bank
    from assistant_server.training.stage1 import train_stage1

    st = s.self_train
    assert st is not None
    out = Path(s.out)
    pseudo_dir = out / "pseudo_bank"
    if (pseudo_dir / "pseudo_labels.json").is_file():  # written last: the build finished
        print(f"pseudo-labeled bank: reusing {pseudo_dir}")
    else:
        if pseudo_dir.exists():  # an interrupted build: it is rebuilt from the teacher
            import shutil

            shutil.rmtree(pseudo_dir)
        build_pseudo_bank(
            PseudoBankSettings(
                ckpt=teacher_ckpt,
                data=s.data,
                labeled=s.labeled,
                out=pseudo_dir,
                patients=st.patients,
                keep=st.keep,
                holdout_patients=st.holdout_patients,
                device=s.device,
                embed_store=st.embed_store,
            )
        )
    student = teacher.model_copy(
        update={"out": out / "assistant.pt", "pseudo_bank": pseudo_dir, "p_pseudo": st.p_pseudo}
    )
    return train_stage1(student)
