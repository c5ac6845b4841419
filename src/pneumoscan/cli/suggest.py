"""Usage errors that help: an unknown option names the closest option of *its* sub-command.

``pneumoscan predict --heatmaps x`` used to print the top-level usage and "unrecognized
arguments"; with :class:`SuggestingParser` it prints one line and exits 2::

    pneumoscan predict: error: unknown option --heatmaps (did you mean --heatmap?)

Sub-command parsers inherit the class (``add_parser`` uses the parent's class), so every
sub-command, nested ones included, reports its own leftovers. A misspelt choice
(``pneumoscan predcit``) gets a "did you mean" too.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any, NoReturn, Sequence

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")


def closest(word: str, candidates: Sequence[str]) -> str | None:
    """The candidate most similar to ``word`` (difflib, ratio ≥ 0.6), or ``None``.

    Args:
        word: what was typed.
        candidates: what would have been valid.
    """
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """One sentence about arguments ``parser`` did not recognise, with the closest option (words
    after an unknown option are taken as its value and not mentioned).

    Args:
        parser: the (sub-command) parser that was left with ``extras``.
        extras: its unrecognised arguments.
    """
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]  # noqa: SLF001
    unknown = [e for e in extras if e.startswith("-") and len(e) > 1]
    if not unknown:
        return f"unexpected argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)} (see '{parser.prog} --help')"
    first = unknown[0].split("=", 1)[0]
    guess = closest(first, options)
    hint = f"did you mean {guess}?" if guess else f"see '{parser.prog} --help'"
    more = f"; also unknown: {', '.join(e.split('=', 1)[0] for e in unknown[1:])}" if len(unknown) > 1 else ""
    return f"unknown option {first} ({hint}){more}"


class SuggestingParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors suggest the closest valid word.

    Every pneumoscan parser knows all of its arguments, so leftovers are an error of the
    parser that was left with them (a sub-command's, not the top level's).
    """

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.exit(2, f"{self.prog}: error: {unknown_message(self, extras)}\n")
        return ns, extras

    def error(self, message: str) -> NoReturn:
        m = _INVALID_CHOICE.search(message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            guess = closest(m.group(1), choices)
            if guess:
                message = f"{message}; did you mean '{guess}'?"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")
