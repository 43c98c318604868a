"""The command-line conventions every `python -m` entry point of the project follows.

- `--help` exits 0 and shows each option's default.
- Bad input is one line on stderr, `PROG: error: <what is wrong, the bad value, what is allowed>`,
  and exit status 2, before any work starts and before anything is written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block) and whose help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(self.prog, message)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each option's help (unless its help already states them), description kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def fail(prog: str, message: str) -> None:
    """Print `PROG: error: MESSAGE` (one line) on stderr and exit with status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def exit_now(code: int) -> None:
    """End a finished command with `code` without running exit handlers: JAX's frees every compiled
    program one by one (about 1 s after `sims.forgetting --quick`, 0.35 s after the reference
    benchmark, 2-core Xeon of BENCHMARKS.md). For `if __name__ == "__main__"` blocks only, once
    every output is written and closed; its streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def positive(kind=int):
    """argparse type: a number > 0 of `kind`, the bad value named otherwise."""
    return _bounded(kind, lambda v: v > 0, "> 0")


def non_negative(kind=int):
    """argparse type: a number >= 0 of `kind`."""
    return _bounded(kind, lambda v: v >= 0, ">= 0")


def _bounded(kind, ok, what):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ok(v) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r}: allowed {'integers' if kind is int else 'numbers'} {what}")
        return v

    parse.__name__ = kind.__name__
    return parse


def number_list(text: str, what: str, kind=float) -> list:
    """Comma-separated finite numbers of `kind` (int or float); ValueError naming the bad entry, or
    the option when there is none."""
    noun = "integers" if kind is int else "numbers"
    vals = []
    for s in (t.strip() for t in text.split(",") if t.strip()):
        try:
            vals.append(kind(s))
        except ValueError:
            raise ValueError(f"{what} must be comma-separated {noun}; got {s!r} in {text!r}") from None
        if not math.isfinite(vals[-1]):
            raise ValueError(f"{what} must be finite {noun}; got {s!r}")
    if not vals:
        raise ValueError(f"{what} is empty; allowed: comma-separated {noun}")
    return vals
