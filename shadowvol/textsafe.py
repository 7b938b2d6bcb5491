"""Guest strings made safe to show on an analyst's terminal.

Every string read out of the guest (a task's ``comm``, a command line, a
path, a module name, the kernel banner) is the attacker's to choose. Printed
as it is, an escape sequence in a process name moves the cursor, erases the
row above or retitles the terminal, so a process can hide itself or another
from the analyst's view. A carriage return or a backspace overwrites what
came before it on the line, and a newline or a tab in a command line draws
a row or a column that is not there. Invisible characters make ``ss\\u200bhd``
look like ``sshd``.

Text output (``-r quick`` and ``-r pretty``, ``watch``, ``diff``, ``trace``,
``trace-check``, ``vm banner``, error and log lines) therefore shows each such
character as an escape: ``\\xNN`` for the C0 controls, DEL and the C1
controls, ``\\uNNNN`` for the invisible and direction-changing characters.
Nothing else changes, so text without them, nearly all of it, is byte for
byte what stock volatility3 prints.
The data formats (``-r json``, ``jsonl``, ``csv``) carry the exact values.
A backslash is not escaped: ``\\x1b`` as four characters is a string that
was written to look like an escape (``-r json`` tells the two apart).
"""

from __future__ import annotations

import re
from typing import Any, Callable

#: C0 controls (but tab and newline), DEL, C1 controls; then the zero-width and
#: direction characters (ZWSP..RLM, LS, PS, LRE..RLO, WJ..invisible plus, LRI..PDI,
#: ALM, BOM) that terminals draw as nothing or use to reorder text.
_INVISIBLE = "\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_UNSAFE_IN_LAYOUT = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_INVISIBLE}]")
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_INVISIBLE}]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, layout: bool = False) -> str:
    """``text`` with every character a terminal acts on, or draws as nothing,
    written as an escape. ``layout``: keep tabs and newlines (text that a
    renderer laid out itself, such as a disassembly or a hex dump)."""
    if text.isascii() and text.isprintable():  # " " to "~" only: nothing to escape (nearly every cell)
        return text
    return (_UNSAFE_IN_LAYOUT if layout else _UNSAFE).sub(_escape, text)  # no match: ``text`` itself


def _printable_cells(render: Callable[[Any], str]) -> Callable[[Any], str]:
    def render_printable(value: Any) -> str:
        # A plain string's tabs and newlines are the guest's data too; other
        # values' text (a disassembly, a hex dump) was laid out by the renderer.
        return printable(render(value), layout=not isinstance(value, str))

    return render_printable


def printable_type_renderers(type_renderers: dict) -> dict:
    """A text renderer's ``_type_renderers`` (volatility3.cli.text_renderer), each
    cell's text passed through :func:`printable`: a string value in full, other
    values' text (disassembly, hex dumps, multi-line data) keeping its layout.
    Set on a renderer instance, so the stock class stays as it is."""
    return {kind: _printable_cells(render) for kind, render in type_renderers.items()}
