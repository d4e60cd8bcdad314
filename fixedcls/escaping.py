"""Text made safe for where it goes: a spreadsheet cell, a Markdown table cell, a terminal line, a word a user
pastes into a shell.

Names come from users (class folders, image files, run names, override values) and may hold characters that mean
something where the text lands: a leading = makes a spreadsheet run the cell as a formula, a | ends a Markdown
cell, a newline or an escape sequence rewrites what a terminal shows, a space splits a shell word. Each function
here is the one rule for its destination; every CSV writer, Markdown table and terminal line of names uses it.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterable

# A spreadsheet takes a cell that starts with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as written: text that starts with =, +, -, @, a tab or a carriage return
    gets a leading ' (OWASP's advice against CSV injection); numbers, and text that is a plain number (-0.5,
    +1e-3), stay as they are. The csv module quotes the rest (commas, quotes, newlines)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def markdown_cell(value: Any) -> str:
    """`value` as one cell of a Markdown table: control characters written as `terminal` writes them (a newline
    would end the row), then backslashes and | escaped (an unescaped | ends the cell, and a backslash before a
    | written by the value would escape the escape)."""
    return terminal(value).replace("\\", "\\\\").replace("|", "\\|")


def markdown_row(cells: Iterable[Any]) -> str:
    """One row of a Markdown table, every cell escaped by `markdown_cell`."""
    return "| " + " | ".join(map(markdown_cell, cells)) + " |"


def terminal(text: object) -> str:
    """`text` with every character a terminal would act on instead of show (control characters, line and
    paragraph separators, bidi overrides: what str.isprintable refuses) written as Python writes it in a
    literal (``\\n``, ``\\x1b``, ``\\u202e``); other characters, accents and scripts included, stay as they are."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def shell_path(path: str | Path) -> str:
    """`path` as a user pastes it into a shell here: relative to the working directory when it lies below it,
    quoted when it holds characters a shell treats specially."""
    path = Path(path)
    try:
        shown = path.resolve().relative_to(Path.cwd().resolve()) if path.is_absolute() else path
    except (ValueError, OSError):
        shown = path
    return terminal(shlex.quote(os.fspath(shown)))
