"""Option checks shared by the commands that start an assistant (serve, label, assistant eval/embed,
bank build): one message per bad value, in the CLI's usage-error form (exit 2)."""

from __future__ import annotations

import typer

ENGINE_HELP = "runtime of the encoder and mask decoder: auto (OpenVINO on a CPU, PyTorch on a GPU), torch or openvino"
PRECISION_HELP = "engine precision: f32 (the eager path's labels), bf16 (faster where the CPU has native bf16; labels differ slightly), or auto"


def check_engine(engine: str | None) -> None:
    from assistant_server.engines import ENGINES

    if engine is not None and engine not in ENGINES:
        raise typer.BadParameter(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}", param_hint="--engine")


def check_engine_precision(precision: str | None) -> None:
    from assistant_server.engines.openvino_runtime import PRECISIONS

    if precision is not None and precision not in PRECISIONS:
        raise typer.BadParameter(
            f"unknown engine precision {precision!r}: one of {', '.join(PRECISIONS)}", param_hint="--engine-precision"
        )
