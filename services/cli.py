"""The `vessa` command. Each package contributes its own sub-commands; this module only assembles them.

Heavy imports (torch, ray) stay inside the command functions, so `vessa --help` stays fast.
"""

from __future__ import annotations

import typer

from assistant_server.cli import register as register_assistant
from services.commands import register as register_services
from services.demo import register as register_demo
from shared.data.cli import data_app
from student_trainer.cli import register as register_trainer

app = typer.Typer(
    name="vessa",
    help="VESSA: vision-language enhanced semi-supervised segmentation assistant.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
register_assistant(app)
register_trainer(app)
register_services(app)
register_demo(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
