"""The `mmn` command: its sub-commands, and how errors end. Bad input ends in one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings

from safetensors import SafetensorError

from .. import __version__
from ..errors import MMNError
from . import bench, caption, edit, explain, find, serve


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth saying (not None, False or a suppressed one)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub-)command's --help shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmn", description="Find and edit multi-modal neurons in vision-language models.")
    p.add_argument("--version", action="version", version=f"mmn_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    find.register(sub)  # find, top-tokens, demo: listed first
    caption.register(sub)  # caption
    edit.register(sub)  # edit, patch bake|inspect|verify
    explain.register(sub)  # heatmap, metrics, report
    serve.register(sub)  # serve
    bench.register(sub)  # bench
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A library warning as one line on stderr, like the CLI's errors (no file:line, no category)."""
    text = str(message)
    print(text if text.startswith("mmn:") else f"mmn: warning: {text}", file=sys.stderr)


@contextlib.contextmanager
def _library_messages(quiet: bool):
    """The library reports progress through the `mmn_fast` logger (INFO): the CLI shows it on stdout
    unless --quiet, and its warnings as one line each on stderr, for the duration of the command."""
    logger = logging.getLogger("mmn_fast")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    if not quiet:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `find --nproc N` passes it on to the processes it launches
    try:
        with _library_messages(quiet=getattr(args, "quiet", False)):
            return args.func(args)
    except MMNError as e:
        print(f"mmn: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a folder, unwritable, on a full disk...: one line, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"mmn: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, SafetensorError) as e:  # a truncated or foreign file; anything else is a bug
        print(f"mmn: error: a file could not be read ({type(e).__name__}: {e}); is it complete, and written by "
              "mmn_fast or Hugging Face?", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " (run the same command again to resume where it stopped)" if args.func in (find.cmd_find, caption.cmd_caption) \
            else ""
        print(f"mmn: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
