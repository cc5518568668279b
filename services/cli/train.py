"""`vessa train | eval | predict`: the student trainer's commands, added to the root app by `register`.

Heavy imports (torch, the data layer) happen inside the commands so `vessa --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer


def _setup_logging(out_dir: Path | None = None) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_vessa", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._vessa = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def train_command(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (configs/train/*.yaml)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from OUT_DIR/latest.pt at its step")
    ] = False,
    show_config: Annotated[
        bool, typer.Option("--show-config", help="print the resolved config and exit")
    ] = False,
    method: Annotated[str | None, typer.Option(help="supervised | mean_teacher | bcp | bcp_vessa (pseudo_labels runs inside `vessa label --rounds K` only)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", "-o", help="run directory")] = None,
    data_root: Annotated[Path | None, typer.Option("--data", help="dataset directory (data.root)")] = None,
    max_iters: Annotated[int | None, typer.Option(help="(self-)training iterations")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override any key: --set bcp.pretrain_iters=100 (repeatable)"),
    ] = None,
) -> None:
    """Train the student (Stage 2) with one method; see configs/train/."""
    from shared.config import dump_yaml, load_settings
    from student_trainer.config import TrainSettings, parse_set_options

    overrides = parse_set_options(set_)
    flat = {"method": method, "out_dir": out_dir, "max_iters": max_iters, "device": device, "seed": seed}
    for key, value in flat.items():
        if value is not None:
            overrides[key] = value
    if data_root is not None:
        overrides["data"] = {**overrides.get("data", {}), "root": data_root}
    cfg = load_settings(TrainSettings, config, **overrides)
    if show_config:
        typer.echo(dump_yaml(cfg), nl=False)
        return
    _setup_logging(Path(cfg.out_dir))
    from student_trainer.train import train

    result = train(cfg, resume=resume)
    typer.echo(json.dumps(result, indent=2))


def eval_command(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="a student checkpoint (best.pt, latest.pt)")],
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    split: Annotated[str, typer.Option(help="val | test")] = "val",
    out: Annotated[
        Path | None, typer.Option("--out", help="write metrics.json and predicted NIfTI here")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    max_volumes: Annotated[int | None, typer.Option(help="only the first N volumes")] = None,
) -> None:
    """Per-volume, per-class Dice, Jaccard, HD95 and ASD of a checkpoint on a split's 3D volumes."""
    _setup_logging()
    from student_trainer.evaluate import run_eval

    report = run_eval(ckpt, data, split, out_dir=out, device=device, max_volumes=max_volumes)
    typer.echo(report["table"])
    if out is None:
        typer.echo(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2))
    else:
        typer.echo(f"metrics: {Path(out) / 'metrics.json'}")


def predict_command(
    input_path: Annotated[Path, typer.Argument(help="input volume .nii/.nii.gz, or a folder of one DICOM series")],
    ckpt: Annotated[Path, typer.Option("--ckpt", help="a student checkpoint")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output label map .nii.gz")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seg: Annotated[
        bool, typer.Option("--seg", help="DICOM input: also write a DICOM-SEG beside the label map (OUTPUT with .dcm)")
    ] = False,
    series: Annotated[
        str | None, typer.Option("--series", help="DICOM input: the SeriesInstanceUID to segment (a folder of several series)")
    ] = None,
) -> None:
    """Segment a NIfTI volume or a DICOM series; the label map keeps the input's geometry (uint8)."""
    if not input_path.exists():
        raise typer.BadParameter(f"no such file or folder: {input_path}", param_hint="INPUT_PATH")
    if (seg or series is not None) and not input_path.is_dir():
        raise typer.BadParameter("--seg and --series need a DICOM folder as input", param_hint="--seg")
    from student_trainer.predict import predict_file

    summary = predict_file(ckpt, input_path, output, device=device, seg=seg, series_uid=series)
    typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    """Add `train`, `eval` and `predict` to the root `vessa` app."""
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("predict")(predict_command)


if __name__ == "__main__":  # `python -m services.cli.train train|eval|predict ...` without the root app
    _app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
    register(_app)
    _app()
