"""shadowvol/textsafe.py: guest strings shown on a terminal, with every character
a terminal acts on (or draws as nothing) as a visible escape."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

from hypothesis import given
from hypothesis import strategies as st

from shadowvol.textsafe import printable, printable_type_renderers

#: What a terminal acts on or hides, written out independently of the module's patterns.
UNSAFE = {*range(0x00, 0x20), *range(0x7F, 0xA0), 0x061C, 0x180E, *range(0x200B, 0x2010),
          *range(0x2028, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x206A), 0xFEFF}
LAYOUT = {ord("\t"), ord("\n")}


def _unescape(text: str) -> str:
    return re.sub(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})", lambda m: chr(int(m.group(1) or m.group(2), 16)), text)


def test_what_a_hostile_process_name_becomes():
    assert printable("ev\x1b[2Ki\r\x9bl\u202e") == "ev\\x1b[2Ki\\x0d\\x9bl\\u202e"
    assert printable("ss\u200bhd") == "ss\\u200bhd"
    assert printable("a\tb\nc\x00") == "a\\x09b\\x0ac\\x00"
    assert printable("a\tb\nc\x00", layout=True) == "a\tb\nc\\x00"
    assert printable("kworker/0:1-events ünï 进程 \\x1b") == "kworker/0:1-events ünï 进程 \\x1b"


@given(st.text())
def test_no_unsafe_character_survives_and_nothing_else_changes(text):
    out = printable(text)
    assert not any(ord(c) in UNSAFE for c in out)
    if not any(ord(c) in UNSAFE for c in text):
        assert out == text
    if "\\" not in text:
        assert _unescape(out) == text  # unambiguous where the guest wrote no backslash


@given(st.text())
def test_layout_keeps_tabs_and_newlines_only(text):
    out = printable(text, layout=True)
    assert not any(ord(c) in UNSAFE - LAYOUT for c in out)
    assert out.count("\t") == text.count("\t") and out.count("\n") == text.count("\n")
    if "\\" not in text:
        assert _unescape(out) == text


def _render(renderer_cls, rows, safe: bool) -> str:
    from volatility3.cli import text_renderer
    from volatility3.framework import renderers

    grid = renderers.TreeGrid([("PID", int), ("COMM", str), ("Data", bytes), ("Dis", renderers.Disassembly)],
                              iter([(0, row) for row in rows]))
    renderer = getattr(text_renderer, renderer_cls)()
    if safe:
        renderer._type_renderers = printable_type_renderers(renderer._type_renderers)
    out = io.StringIO()
    with redirect_stdout(out):
        renderer.render(grid)
    return out.getvalue()


ROWS_PLAIN = [(1, "init", b"\x1b\x00", None), (2, "kthreadd", b"", None)]


def test_stock_renderers_print_plain_rows_byte_for_byte():
    from volatility3.framework import renderers

    rows = [(pid, comm, data, renderers.Disassembly(b"\x90\xc3", 0x1000, "intel64")) for pid, comm, data, _ in
            ROWS_PLAIN]
    for cls in ("QuickTextRenderer", "PrettyTextRenderer"):
        assert _render(cls, rows, safe=True) == _render(cls, rows, safe=False)


def test_stock_renderers_show_a_hostile_cell_escaped():
    from volatility3.framework import renderers

    dis = renderers.Disassembly(b"\x90\xc3", 0x1000, "intel64")  # its own lines and tabs stay
    rows = [(1, "ev\x1b[1A\x1b[2K\r", b"", dis), (2, "x\n3\tfake", b"", dis)]
    for cls in ("QuickTextRenderer", "PrettyTextRenderer"):
        out = _render(cls, rows, safe=True)
        assert "ev\\x1b[1A\\x1b[2K\\x0d" in out and "x\\x0a3\\x09fake" in out
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", out)
        assert "\n0x1000:\tnop\t\n" in out or "| 0x1000: nop" in out  # the disassembly kept its lines
    quick = _render("QuickTextRenderer", rows, safe=True)
    assert "\n0x1000:\tnop\t\n" in quick
    rows_drawn = [line.split("\t")[0] for line in quick.split("\n") if line[:1].isdigit() and line[:2] != "0x"]
    assert rows_drawn == ["1", "2"]  # no row drawn by the guest


def test_trace_watch_and_diff_lines_show_guest_strings_escaped():
    from shadowvol.diff import render_text
    from shadowvol.trace.events import Event, format_event
    from shadowvol.watch import _emit

    ev = Event(kind="exec", ts_ns=1, cpu=0, pid=7, tgid=7, comm="a\x1b]0;t\x07", extra={"filename": "/x\r\n"})
    assert re.search(r" 7/7 +a\\x1b\]0;t\\x07 +exec /x\\x0d\\x0a$", format_event(ev))
    out = io.StringIO()
    _emit(out, "text", "+", 1, {"PID": 7, "COMM": "a\x1b[2K\tb"}, set())
    assert out.getvalue() == "+ 7\ta\\x1b[2K\\x09b\n"
    text = render_text([{"kind": "task", "change": "added", "pid": 7, "after": {"comm": "x\x9by"}}])
    assert "x\\x9by" in text and not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)


def test_trace_check_report_lines_show_guest_names_escaped():
    from shadowvol.integrity import IntegrityReport, render_report

    rep = IntegrityReport(vm="web01")
    rep.add("hook.sys_enter", "TAMPERED", "foreign probe(s) run before the stub's: evil\x1b[8m")
    assert render_report(rep).endswith("foreign probe(s) run before the stub's: evil\\x1b[8m")


def test_volatility3_log_lines_show_guest_strings_escaped(capsys):
    """The CLI's handler prints what lastResort would (the message, WARNING and up), escaped."""
    import logging

    from shadowvol.run import printable_volatility_log

    logger = logging.getLogger("volatility3")
    handlers, propagate = list(logger.handlers), logger.propagate
    try:
        printable_volatility_log()
        printable_volatility_log()  # once per process
        assert [type(h).__name__ for h in logger.handlers].count("PrintableStderr") == 1
        child = logging.getLogger("volatility3.framework.symbols.linux.extensions")
        child.warning("Unable to read %s", "ev\x1b[2K\r\n")
        child.info("not shown")
        assert capsys.readouterr().err == "Unable to read ev\\x1b[2K\\x0d\n\n"
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate


def test_an_error_line_quoting_hostile_text_is_escaped(capsys, monkeypatch):
    """Our messages quote names with repr(); an error carrying a guest string as
    it is (a volatility3 exception, a cell's text) is escaped at the last step."""
    from shadowvol import run
    from shadowvol.cli import main
    from shadowvol.errors import ShadowvolError

    def fail(argv):
        raise ShadowvolError("module ev\x1b[2K\r is hidden")

    monkeypatch.setattr(run, "run_plugin_cli", fail)
    assert main(["-vm", "x", "linux.lsmod"]) == 1
    assert capsys.readouterr().err == "shadowvol: error: module ev\\x1b[2K\\x0d is hidden\n"

    def crash(argv):
        raise RuntimeError("ev\x9b")

    monkeypatch.setattr(run, "run_plugin_cli", crash)
    assert main(["-vm", "x", "linux.lsmod"]) == 2
    assert "ev\\x9b" in capsys.readouterr().err
