"""The `vessa` command. Each package contributes its own sub-commands; this module only assembles them.

Sub-command modules are imported lazily-enough (at start) but keep heavy imports (torch, ray) inside
their command functions, so `vessa --help` stays fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vessa",
    help="VESSA: vision-language enhanced semi-supervised segmentation assistant.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    try:
        from shared.data.cli import data_app

        app.add_typer(data_app, name="data")
    except ImportError as exc:  # pragma: no cover
        if "shared.data.cli" not in str(exc):
            raise
    try:  # later packages add their commands here; each module owns its own sub-app
        from assistant_server.cli import register as register_assistant

        register_assistant(app)
    except ImportError as exc:  # pragma: no cover - only while a package is being built
        if "assistant_server.cli" not in str(exc):
            raise
    try:
        from student_trainer.cli import register as register_trainer

        register_trainer(app)
    except ImportError as exc:  # pragma: no cover
        if "student_trainer.cli" not in str(exc):
            raise
    try:
        from services.commands import register as register_services

        register_services(app)
    except ImportError as exc:  # pragma: no cover
        if "services.commands" not in str(exc):
            raise


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
