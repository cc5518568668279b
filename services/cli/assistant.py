"""`vessa bank …` and `vessa assistant …` commands. Heavy imports stay inside the commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from services.cli.options import ENGINE_HELP, PRECISION_HELP, check_engine, check_engine_precision

bank_app = typer.Typer(
    help="Template banks: build from a dataset's labeled cases, list, remove exemplars.", no_args_is_help=True
)
assistant_app = typer.Typer(
    help="The VESSA assistant: Stage-1 training, evaluation, embedding caches.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(bank_app, name="bank")
    app.add_typer(assistant_app, name="assistant")


@bank_app.command("build")
def bank_build(
    data: Path = typer.Option(
        ..., "--data", help="dataset directory (SSL4MIS HDF5, MSD NIfTI or prepared cache)"
    ),
    labeled: int = typer.Option(
        ..., "--labeled", help="number of labeled patients (the first N, protocol order)"
    ),
    out: Path = typer.Option(..., "--out", help="bank directory to create"),
    encoder: str = typer.Option("litemedsam", help="litemedsam (pretrained) or tiny (tests only)"),
    device: str | None = typer.Option(None, help="cpu, cuda, … (default: cuda if available)"),
    batch_size: int = typer.Option(8, help="slices per encoder batch"),
    engine: str = typer.Option("auto", "--engine", help="encoder runtime: auto (OpenVINO at f32 on a CPU, PyTorch on a GPU), torch or openvino"),
):
    """Build a template bank: every slice of the first N patients becomes an exemplar (text embedded once)."""
    from assistant_server.bank_builder import build_bank

    check_engine(engine)
    bank = build_bank(data, labeled, out, encoder=encoder, device=device, batch_size=batch_size, engine=engine)
    typer.echo(
        f"bank {out}: version {bank.version}, {len(bank)} exemplars from {len(set(bank.patient_ids()))} patients, classes {[c.name for c in bank.classes]}"
    )


@bank_app.command("list")
def bank_list(
    bank: Path = typer.Argument(..., help="bank directory"), as_json: bool = typer.Option(False, "--json")
):
    """Version, classes and exemplars of a bank."""
    from assistant_server.bank import TemplateBank

    b = TemplateBank(bank)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "version": b.version,
                    "classes": [c.__dict__ for c in b.classes],
                    "exemplars": [e.__dict__ for e in b.exemplars],
                },
                indent=1,
            )
        )
        return
    typer.echo(f"version {b.version}; classes {[(c.index, c.name) for c in b.classes]}; {len(b)} exemplars")
    for e in b.exemplars:
        typer.echo(
            f"  {e.id}  patient={e.patient_id} case={e.case_id} slice={e.slice_index} {e.height}x{e.width}"
        )


@bank_app.command("remove")
def bank_remove(bank: Path = typer.Argument(...), ids: list[str] = typer.Argument(..., help="exemplar ids")):
    """Remove exemplars; prints the new version."""
    from assistant_server.bank import TemplateBank

    typer.echo(f"version {TemplateBank(bank).remove(ids)}")


@assistant_app.command("train")
def assistant_train(
    bank: Path | None = typer.Option(None, "--bank", help="template bank (vessa bank build)"),
    out: Path | None = typer.Option(None, "--out", help="checkpoint file to write"),
    config: Path | None = typer.Option(None, "--config", help="YAML with Stage1Settings keys"),
    steps: int | None = typer.Option(None, help="training steps"),
    batch_size: int | None = typer.Option(None, help="queries per step"),
    encoder: str | None = typer.Option(None, help="litemedsam or tiny"),
    device: str | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="continue from <out>.latest.pt"),
    no_text: bool = typer.Option(False, "--no-text-tokens", help="ablation: without text tokens"),
    no_transfer: bool = typer.Option(False, "--no-label-transfer", help="ablation: without label transfer"),
    no_iou: bool = typer.Option(False, "--no-iou-head", help="ablation: without the IoU head"),
    show_config: bool = typer.Option(False, "--show-config", help="print the resolved config and exit"),
):
    """Stage-1 episodic training on the bank's labeled exemplars (templates from other patients)."""
    from assistant_server.training.stage1 import Stage1Settings, train_stage1
    from shared.config import dump_yaml, load_settings

    s = load_settings(
        Stage1Settings,
        config,
        bank=bank,
        out=out,
        steps=steps,
        batch_size=batch_size,
        encoder=encoder,
        device=device,
        seed=seed,
        resume=resume or None,
        use_text_tokens=False if no_text else None,
        use_label_transfer=False if no_transfer else None,
        use_iou_head=False if no_iou else None,
    )
    if show_config:
        typer.echo(dump_yaml(s))
        return
    path = train_stage1(s)
    typer.echo(f"checkpoint: {path}")


@assistant_app.command("recipe")
def assistant_recipe(
    config: Path | None = typer.Option(None, "--config", help="recipe YAML (configs/assistant/*.yaml)"),
    data: Path | None = typer.Option(None, "--data", help="dataset directory (overrides the config)"),
    labeled: int | None = typer.Option(None, "--labeled", help="labeled patients, the first N"),
    out: Path | None = typer.Option(None, "--out", help="recipe directory (bank/, assistant.pt)"),
    encoder: str | None = typer.Option(None, help="litemedsam or tiny (tests only)"),
    device: str | None = typer.Option(None, help="cpu, cuda, … (default: cuda if available)"),
    steps: int | None = typer.Option(None, help="override the config's Stage-1 steps"),
    batch_size: int | None = typer.Option(None, help="override the config's Stage-1 batch size"),
    seed: int | None = typer.Option(None, help="override the config's Stage-1 seed (views, episodes, init)"),
    show_config: bool = typer.Option(False, "--show-config", help="print the resolved recipe and exit"),
):
    """Bank + Stage-1 in one command: build the template bank of the first N patients, then train the
    assistant on it with the recipe's schedule; the checkpoint carries the inference options it is
    served with. Rerun to resume."""
    from assistant_server.training.recipe import RecipeSettings, run_recipe
    from shared.config import dump_yaml, load_settings

    s = load_settings(RecipeSettings, config, data=data, labeled=labeled, out=out, encoder=encoder, device=device)
    extra = {
        k: v for k, v in {"steps": steps, "batch_size": batch_size, "seed": seed}.items() if v is not None
    }
    if extra:
        s = s.model_copy(update={"train": {**s.train, **extra}})
    if show_config:
        typer.echo(dump_yaml(s))
        return
    path = run_recipe(s)
    typer.echo(f"checkpoint: {path}")


@assistant_app.command("eval")
def assistant_eval(
    ckpt: str = typer.Option(..., "--ckpt", help="checkpoint, or 'pretrained' for the untrained assistant"),
    data: Path = typer.Option(..., "--data", help="dataset with validation (or test) volumes"),
    split: str = typer.Option("val", help="val or test"),
    bank: Path | None = typer.Option(
        None, "--bank", help="template bank (default: the one the checkpoint was trained on)"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="directory for metrics.json (and the resolved config)"
    ),
    device: str | None = typer.Option(None),
    limit: int | None = typer.Option(None, help="evaluate only the first N volumes"),
    seed: int = typer.Option(0, help="seed of the simulated noisy student"),
    embed_store: Path | None = typer.Option(None, help="directory persisting encoder embeddings across runs"),
    modes: str | None = typer.Option(
        None, help="comma-separated subset of templates,noisy_student,student_input,litemedsam_box,label_transfer"
    ),
    refine_passes: int | None = typer.Option(None, help="override: self-prompted refinement passes (0-4)"),
    volume_context: float | None = typer.Option(None, help="override: weight of slices z±1 in a refinement prompt"),
    lcc: str | None = typer.Option(None, "--lcc", help="override: largest-component cleaning off|auto|on"),
    keep_share: float | None = typer.Option(
        None, "--keep-share", help="override: with cleaning, also keep components ≥ this share of the largest"
    ),
    templates: int | None = typer.Option(None, "--templates", help="override: templates retrieved per query"),
    position_weight: float | None = typer.Option(
        None, help="override: preference for templates at the same relative position in their volume"
    ),
    volume_templates: int | None = typer.Option(
        None, help="override: a volume's K most confident slices as extra templates for its other slices"
    ),
    cpu_bf16: bool = typer.Option(False, "--cpu-bf16", help="bf16 autocast on the CPU"),
    engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
    engine_precision: str = typer.Option("f32", "--engine-precision", help=PRECISION_HELP),
    refine_below: float | None = typer.Option(
        None, "--refine-below", help="override: refine only slices whose first-pass confidence is below this"
    ),
):
    """Per-volume, per-class Dice/Jaccard/HD95/ASD for prompting modes and baselines (JSON + table), and how
    well the assistant's confidence ranks the volumes (Spearman vs true Dice, reliability table).
    Inference options default to the checkpoint's own (what a replica serves); flags override them."""
    from assistant_server.training.evaluate import MODES, EvalSettings, evaluate_assistant
    from shared.calibration import reliability_markdown

    check_engine(engine)
    check_engine_precision(engine_precision)
    chosen = tuple(m.strip() for m in modes.split(",")) if modes else MODES
    unknown = [m for m in chosen if m not in MODES]
    if unknown:
        raise typer.BadParameter(f"unknown mode(s) {unknown}: choose from {list(MODES)}", param_hint="--modes")
    s = EvalSettings(
        ckpt=ckpt,
        data=data,
        split=split,
        bank=bank,
        out=out,
        device=device,
        limit=limit,
        seed=seed,
        embed_store=embed_store,
        modes=chosen,
        refine_passes=refine_passes,
        volume_context=volume_context,
        largest_component=lcc,
        component_keep_share=keep_share,
        num_templates=templates,
        position_weight=position_weight,
        volume_templates=volume_templates,
        cpu_bf16=cpu_bf16,
        engine=engine,
        engine_precision=engine_precision,
        refine_below=refine_below,
    )
    report = evaluate_assistant(s)
    typer.echo(report["table"])
    for mode, r in report["ranking"].items():
        per_class = ", ".join(f"{k} {v:.2f}" for k, v in r["spearman_per_class"].items())
        typer.echo(f"\nconfidence vs true Dice, {mode}: Spearman {r['spearman']:.3f} over volumes ({per_class})")
        typer.echo(reliability_markdown(r["reliability"]))


@assistant_app.command("embed")
def assistant_embed(
    data: Path = typer.Option(..., "--data"),
    store: Path = typer.Option(..., "--store", help="embedding store directory"),
    device: str | None = typer.Option(None),
    batch_size: int = typer.Option(8),
    engine: str = typer.Option("auto", "--engine", help="encoder runtime: auto (OpenVINO at f32 on a CPU, PyTorch on a GPU), torch or openvino"),
):
    """Compute and persist the encoder embeddings of a dataset's canonical training slices (CPU runs)."""
    from assistant_server.training.evaluate import embed_dataset

    check_engine(engine)
    n = embed_dataset(data, store, device=device, batch_size=batch_size, engine=engine)
    typer.echo(f"{n} embeddings in {store}")


@assistant_app.command("pseudo-bank")
def assistant_pseudo_bank(
    ckpt: Path = typer.Option(..., "--ckpt", help="the teacher: a Stage-1 checkpoint"),
    data: Path = typer.Option(..., "--data", help="dataset whose unlabeled training volumes are labeled"),
    labeled: int = typer.Option(..., "--labeled", help="labeled patients (the first N); the rest are unlabeled"),
    out: Path = typer.Option(..., "--out", help="pseudo-labeled bank directory to create"),
    bank: Path | None = typer.Option(None, "--bank", help="the teacher's bank (default: its training bank)"),
    patients: int | None = typer.Option(None, "--patients", help="unlabeled patients to label (default 16)"),
    keep: float | None = typer.Option(None, "--keep", help="share of each volume's foreground slices kept (0.5)"),
    holdout_patients: int | None = typer.Option(
        None, "--holdout-patients", help="leave out the last K patients (the `vessa data holdout` set)"
    ),
    device: str | None = typer.Option(None),
    embed_store: Path | None = typer.Option(None, "--embed-store", help="persistent embedding store"),
):
    """Self-training data: the teacher labels unlabeled volumes, its most confident slices become a bank
    for Stage-1's `pseudo_bank`/`p_pseudo` (no label of an unlabeled case is read)."""
    from assistant_server.training.pseudo_bank import PseudoBankSettings, build_pseudo_bank

    given = {"patients": patients, "keep": keep, "holdout_patients": holdout_patients}  # None: the settings' default
    s = PseudoBankSettings(
        ckpt=ckpt, data=data, labeled=labeled, out=out, bank=bank, device=device, embed_store=embed_store,
        **{k: v for k, v in given.items() if v is not None},
    )
    pb = build_pseudo_bank(s)
    typer.echo(f"pseudo-labeled bank {out}: {len(pb)} exemplars from {len(set(pb.patient_ids()))} patients")
