"""The command lines' shared help format (pure argparse: the world's CLI uses it too)."""
from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the help says 'unset'); the description
    and the examples kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not argparse.SUPPRESS and "unset" not in text \
                and action.option_strings and action.nargs != 0:
            default = action.default
            text += f" (default: {default!r})" if isinstance(default, str) else \
                f" (default: {default})"
        return text


def run_checked(parser: argparse.ArgumentParser, check, run, argv=None, user_errors=()):
    """``check(args)`` errors (ValueError, OSError: a bad argument or input) end the command
    as argparse's own do, one line naming the argument, exit code 2; then ``run(args)``,
    whose ``user_errors`` (a bad file found only when read) end the same way."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        return run(args)
    except user_errors as exc:
        parser.error(str(exc))
