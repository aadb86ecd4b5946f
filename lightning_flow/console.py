"""The ``lightning-flow`` command (also ``python -m lightning_flow``): ``fit``, ``validate``, ... through
LightningCLI (``lightning_flow.cli``) and ``trace`` (``lightning_flow.trace_cli``).

A mistake in the settings, the data or a path ends the run with one line that names it;
``--debug`` or ``LIGHTNING_FLOW_DEBUG=1`` shows the traceback instead. Light to import: the
third-party noise is silenced before torch, transformers and Lightning load.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

DEBUG_VARIABLE = "LIGHTNING_FLOW_DEBUG"


def condensed(message: str) -> str:
    """jsonargparse's and Lightning's multi-line messages in one line: the key and the reasons,
    without the union's subtypes and the repeated given value."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    key = re.fullmatch(r'Parser key "([^"]+)":', lines[0]) if lines else None
    noise = (
        "Given value",
        "Subtypes:",
        "Errors:",
        "Does not validate against",
        "- Expected a <class 'NoneType'>",
    )
    reasons = []
    for line in lines[1:] if key else lines:
        reason = line.removeprefix("- ")
        if (
            not line.startswith(noise)
            and not reason.startswith("Expected a path but")
            and reason not in reasons
        ):
            reasons.append(reason)
    text = " ".join(reasons)
    return f"{key.group(1)}: {text}" if key else text


class OneLineErrors:
    """For jsonargparse parsers: a rejected command line ends with one line naming the option
    (``--help`` shows the usage), not the usage dump before it."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # nested parsers hand their errors up; debug mode raises
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {condensed(message)}\n")
        self.exit(2)


_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan")


def negative_values_joined(argv: list[str]) -> list[str]:
    """``--key -1e-3`` as ``--key=-1e-3``: argparse takes a value that starts with ``-`` and is not
    a plain decimal for an option, and would say the option "expected one argument"."""
    joined: list[str] = []
    for arg in argv:
        previous = joined[-1] if joined else ""
        if _NUMBER.fullmatch(arg) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def quiet_third_parties() -> None:
    """Silence what every run printed and no user can act on: Lightning's litlogger tip,
    bitsandbytes' optional CPU kernel, and deprecations inside the pinned libraries."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip")
    )
    for message in (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "`is_gradient_checkpointing` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def is_user_error(error: BaseException) -> bool:
    """Whether a setting, a data file or a path caused ``error``: raised inside a training or
    validation step (a user's reward, a bug), the same types keep their traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_flow.checkpoint_io import CheckpointError

    if isinstance(error, CheckpointError):
        return True
    user_types = (ValueError, OSError, ImportError, MisconfigurationException)
    return isinstance(error, user_types) and not raised_in_a_step(error)


def raised_in_a_step(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name in ("training_step", "validation_step"):
            return True
        frame = frame.tb_next
    return False


def console(argv: list[str] | None = None, prog: str = "lightning-flow") -> None:
    """The ``lightning-flow`` command (and ``python -m lightning_flow``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    argv = negative_values_joined([arg for arg in argv if arg != "--debug"])
    jsonargparse_debug = os.environ.get("JSONARGPARSE_DEBUG")
    if debug:
        os.environ["JSONARGPARSE_DEBUG"] = "true"  # jsonargparse raises instead of exiting
    quiet_third_parties()
    try:
        run_command(argv, prog)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        sys.stderr.write(
            f"{prog}: error: {condensed(str(error))}\n"
            f"{prog}: (--debug or {DEBUG_VARIABLE}=1 shows the traceback)\n"
        )
        raise SystemExit(1) from None
    finally:
        if debug and jsonargparse_debug is None:
            del os.environ["JSONARGPARSE_DEBUG"]


def run_command(argv: list[str], prog: str) -> None:
    """``trace`` goes to its own parser; every other command to LightningCLI."""
    if argv[:1] == ["trace"]:
        from lightning_flow.trace_cli import main as trace_main

        trace_main(argv[1:], prog=f"{prog} trace")
    else:
        from lightning_flow.cli import main

        main(argv, prog=prog)
