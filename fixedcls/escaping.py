"""Text made safe for where it goes: a terminal line, a word a user pastes into a shell.

Names come from users (class folders, image files, run names) and may hold characters that mean something
where the text lands: a newline or an escape sequence rewrites what a terminal shows, a space splits a shell
word. Each function here is the one rule for its destination.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path


def terminal(text: object) -> str:
    """`text` with every character a terminal would act on instead of show (control characters, line and
    paragraph separators, bidi overrides: what str.isprintable refuses) written as Python writes it in a
    literal (``\\n``, ``\\x1b``, ``\\u202e``); other characters, accents and scripts included, stay as they are."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def shell_path(path: str | Path) -> str:
    """`path` as a user pastes it into a shell here: relative to the working directory when it lies below it,
    quoted when it holds characters a shell treats specially."""
    path = Path(path)
    try:
        shown = path.resolve().relative_to(Path.cwd().resolve()) if path.is_absolute() else path
    except (ValueError, OSError):
        shown = path
    return terminal(shlex.quote(os.fspath(shown)))
