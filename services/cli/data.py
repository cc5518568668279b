"""`vessa data ...`: synthesise, inspect and prepare datasets.

Settings resolve as everywhere in VESSA (shared.config): command-line flags, then environment
variables (`VESSA_SYNTH_*`, `VESSA_PREPARE_*`, e.g. `VESSA_SYNTH_CASES=20`), then a YAML file given
with `--config`, then defaults. `--show-config` prints the resolved settings and exits. Commands that
write a dataset save the resolved settings next to it as `config.resolved.yaml`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import typer
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.config import VessaSettings, dump_yaml, load_settings, save_resolved

data_app = typer.Typer(
    help="Datasets: generate synthetic cardiac MRI, inspect a dataset, prepare a compact training cache.",
    no_args_is_help=True,
)


class SynthSettings(VessaSettings):
    """Settings of `vessa data synth` (env prefix VESSA_SYNTH_)."""

    model_config = SettingsConfigDict(env_prefix="VESSA_SYNTH_")

    out: Path | None = None
    cases: int = Field(12, ge=1, description="volumes in imagesTr (train + val)")
    seed: int = Field(0, ge=0)
    val_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="share of cases for validation (at least 2)"
    )
    test_cases: int = Field(0, ge=0, description="extra cases written to imagesTs/labelsTs as the test split")
    layout: Literal["msd", "ssl4mis"] = "msd"
    cine: int = Field(0, ge=0, le=64, description="write 4D cines of this many frames instead (a beating heart, truth per frame)")


class PrepareSettings(VessaSettings):
    """Settings of `vessa data prepare` (env prefix VESSA_PREPARE_)."""

    model_config = SettingsConfigDict(env_prefix="VESSA_PREPARE_")

    source: Path | None = None
    out: Path | None = None
    size: int = Field(256, ge=8, description="training slices are resized to size x size")
    codec: Literal["bz2-up", "xz-up", "zlib"] = "bz2-up"
    workers: int = Field(2, ge=1, description="compression threads")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def _resolve(cls, config: Path | None, **overrides):
    try:
        return load_settings(cls, config, **overrides)
    except Exception as exc:  # pydantic validation and YAML errors, reported without a traceback
        _fail(exc)


_CONFIG_HELP = "YAML file with settings (flags and VESSA_* environment variables take precedence)."
_SHOW_HELP = "Print the resolved settings as YAML and exit."


@data_app.command("synth")
def synth(
    out: Path = typer.Argument(..., help="Output directory (created)."),
    cases: int | None = typer.Option(
        None, "--cases", "-k", help="Number of volumes in imagesTr (train + val). Default 12."
    ),
    seed: int | None = typer.Option(
        None, "--seed", "-s", help="Random seed; the same seed gives identical data. Default 0."
    ),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="Share of cases used for validation (at least 2). Default 0.25."
    ),
    test_cases: int | None = typer.Option(
        None, "--test-cases", help="Extra test volumes (imagesTs/labelsTs). Default 0."
    ),
    layout: str | None = typer.Option(
        None, "--layout", help="'msd' (nnU-Net/MSD NIfTI, default) or 'ssl4mis' (HDF5)."
    ),
    cine: int | None = typer.Option(
        None, "--cine", help="Write CASES 4D cines of CINE frames (OUT/<case>_4d.nii.gz, truth in OUT/truth/) instead."
    ),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    show_config: bool = typer.Option(False, "--show-config", help=_SHOW_HELP),
) -> None:
    """Generate synthetic short-axis cardiac cine-MRI (labels 0 bg, 1 RV, 2 Myo, 3 LV) with splits."""
    settings = _resolve(
        SynthSettings,
        config,
        out=out,
        cases=cases,
        seed=seed,
        val_fraction=val_fraction,
        test_cases=test_cases,
        layout=layout,
        cine=cine,
    )
    if show_config:
        typer.echo(dump_yaml(settings), nl=False)
        return
    if settings.cine:
        from shared.data.cine import write_cine_dataset

        started = time.perf_counter()
        try:
            if settings.cine < 2:
                raise ValueError("--cine needs at least 2 frames")
            ids = write_cine_dataset(settings.out, settings.cases, settings.cine, settings.seed)
        except (ValueError, OSError) as exc:
            _fail(exc)
        save_resolved(settings, settings.out)
        typer.echo(
            f"wrote {len(ids)} synthetic cines of {settings.cine} frames to {settings.out} "
            f"(ground truth per frame in {Path(settings.out) / 'truth'}) in {time.perf_counter() - started:.1f} s"
        )
        return
    from shared.data.synth import write_msd_dataset, write_ssl4mis_layout

    started = time.perf_counter()
    try:
        if settings.layout == "msd":
            write_msd_dataset(
                settings.out,
                settings.cases,
                settings.seed,
                settings.val_fraction,
                test_cases=settings.test_cases,
                progress=True,
            )
            splits = json.loads((Path(settings.out) / "splits.json").read_text())
        else:
            n_val = max(2, round(settings.cases * settings.val_fraction))
            splits = write_ssl4mis_layout(
                settings.out, settings.cases, settings.seed, n_val, settings.test_cases
            )
    except (ValueError, OSError) as exc:
        _fail(exc)
    save_resolved(settings, settings.out)
    counts = ", ".join(f"{len(splits.get(s, []))} {s}" for s in ("train", "val", "test") if splits.get(s))
    typer.echo(
        f"wrote {settings.cases + settings.test_cases} synthetic cases ({counts}) to {settings.out} "
        f"[{settings.layout}] in {time.perf_counter() - started:.1f} s"
    )


@data_app.command("info")
def info(
    path: Path = typer.Argument(
        ..., help="Dataset directory: SSL4MIS HDF5, nnU-Net/MSD NIfTI or a prepared cache."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of text."),
    labels: bool = typer.Option(
        True, "--labels/--no-labels", help="Count voxels per class (reads every label)."
    ),
) -> None:
    """Summarise a dataset: format, cases, slices, patients, volumes, classes, shapes, spacing, label counts."""
    from shared.data.info import dataset_info, format_info
    from shared.data.layouts import open_dataset

    try:
        ds = open_dataset(path)
        summary = dataset_info(ds, with_labels=labels, progress=not as_json)
    except (ValueError, OSError, KeyError) as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@data_app.command("prepare")
def prepare(
    source: Path = typer.Argument(
        ..., help="Dataset directory to cache (SSL4MIS HDF5 or nnU-Net/MSD NIfTI)."
    ),
    out: Path = typer.Argument(..., help="Cache directory (created; an existing cache there is replaced)."),
    size: int | None = typer.Option(
        None, "--size", help="Training slices are resized to SIZE x SIZE. Default 256."
    ),
    codec: str | None = typer.Option(
        None, "--codec", help="Image compression: bz2-up (default, smallest), xz-up, zlib."
    ),
    workers: int | None = typer.Option(None, "--workers", help="Compression threads. Default 2."),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    show_config: bool = typer.Option(False, "--show-config", help=_SHOW_HELP),
) -> None:
    """Write a compact cache: resized uint8 training slices, original-size validation/test volumes,
    labels in a separate file, and an index (vessa_cache.json) that `open_dataset` reads."""
    settings = _resolve(
        PrepareSettings, config, source=source, out=out, size=size, codec=codec, workers=workers
    )
    if show_config:
        typer.echo(dump_yaml(settings), nl=False)
        return
    from shared.data.prepare import cache_size_bytes, prepare_cache

    try:
        index = prepare_cache(
            settings.source, settings.out, settings.size, settings.codec, settings.workers, progress=True
        )
    except (ValueError, OSError, KeyError) as exc:
        _fail(exc)
    save_resolved(settings, settings.out)
    parts = ", ".join(f"{name} {n / 1e6:.1f} MB" for name, n in index["sizes"].items())
    typer.echo(
        f"cached {len(index['slices']):,} slices at {index['size']}x{index['size']} and "
        f"{sum(len(v['cases']) for v in index['volumes'].values())} volumes to {settings.out}: "
        f"{cache_size_bytes(index) / 1e6:.1f} MB ({parts}) in {index['seconds']:.1f} s"
    )


@data_app.command("holdout")
def holdout(
    source: Path = typer.Argument(..., help="Dataset whose training cases are split into slices (SSL4MIS)."),
    out: Path = typer.Argument(..., help="Directory to write (SSL4MIS layout, volumes + test.list)."),
    patients: int = typer.Option(10, min=1, help="Take the last K patients of the protocol order."),
    protect: int = typer.Option(7, min=0, help="Never take the first P patients (the labeled sets)."),
) -> None:
    """A second evaluation set: the last K patients' frames as volumes (`--split test`), so a recipe
    chosen on the validation volumes is also scored on volumes no choice was made on."""
    from shared.data.holdout import write_holdout

    try:
        cases = write_holdout(source, out, patients=patients, protect=protect)
    except (ValueError, OSError, KeyError) as exc:
        _fail(exc)
    typer.echo(f"{len(cases)} volumes in {out} (split 'test'): {', '.join(cases[:4])}{' …' if len(cases) > 4 else ''}")
