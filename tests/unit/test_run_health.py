"""run.py's RunHealth: broken stock list walks and error cells are noticed underneath
unmodified plugins and renderers; Windows/macOS plugins on a Linux target are one line."""

from __future__ import annotations

import struct

import pytest
from volatility3.framework import contexts, renderers
from volatility3.framework.layers.physical import BufferDataLayer
from volatility3.framework.symbols.linux import extensions

from shadowvol.errors import ShadowvolError
from shadowvol.run import RunHealth, run_plugin_cli
from shadowvol.volbridge import PreloadedISF

HOLE = 0x800  # [HOLE, 0x1000) reads as missing (a truncated dump, an unmapped page)


class Holed(BufferDataLayer):
    def is_valid(self, offset: int, length: int = 1) -> bool:
        return super().is_valid(offset, length) and offset + length <= HOLE


def _isf() -> dict:
    def ptr(name: str) -> dict:
        return {"kind": "pointer", "subtype": {"kind": "struct", "name": name}}
    return {
        "metadata": {"format": "6.2.0", "producer": {"name": "test", "version": "0"}},
        "base_types": {
            "pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
            "unsigned long": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
        },
        "user_types": {
            "list_head": {"kind": "struct", "size": 16, "fields": {
                "next": {"offset": 0, "type": ptr("list_head")},
                "prev": {"offset": 8, "type": ptr("list_head")}}},
            "item": {"kind": "struct", "size": 24, "fields": {
                "value": {"offset": 0, "type": {"kind": "base", "name": "unsigned long"}},
                "link": {"offset": 8, "type": {"kind": "struct", "name": "list_head"}}}},
        },
        "enums": {}, "symbols": {},
    }


def _walk(links: dict[int, int], head_next: int, head: int = 0x100) -> tuple[list[int], RunHealth]:
    """A list head at ``head`` and items at the keys of ``links`` (value = item address >> 8,
    ``link.next`` = the mapped address); the values the stock walk yields, and what health saw."""
    mem = bytearray(0x1000)
    struct.pack_into("<QQ", mem, head, head_next, 0)
    for item, nxt in links.items():
        struct.pack_into("<QQQ", mem, item, item >> 8, nxt, 0)
    ctx = contexts.Context()
    ctx.layers.add_layer(Holed(ctx, "t.layer", "mem", bytes(mem)))
    ctx.symbol_space.append(PreloadedISF(ctx, "t.sym", "tbl", "file:///t", isf=_isf(),
                                         class_types={"list_head": extensions.list_head}))
    health = RunHealth()
    health.watch_layer(ctx.layers["mem"])
    values = [int(i.value) for i in ctx.object("tbl!list_head", "mem", head).to_list("tbl!item", "link")]
    return values, health


def test_intact_list_is_healthy() -> None:
    values, health = _walk({0x200: 0x308, 0x300: 0x100}, head_next=0x208)
    assert values == [2, 3]
    assert health.broken_walks == [] and health.problems() == []


def test_walk_cut_by_unreadable_link_is_reported() -> None:
    """The truncated-dump case: 2 of the items were listed, exit 0 would be a silent wrong answer."""
    values, health = _walk({0x200: 0x308, 0x300: 0x908}, head_next=0x208)
    assert values == [2, 3]
    assert health.broken_walks == ["list of item.link at 0x100 stopped at unreadable 0x908"]
    assert len(health.problems()) == 1 and "incomplete" in health.problems()[0]


def test_first_link_unreadable_is_reported() -> None:
    """An empty answer from a list whose head points into missing memory (the 160 MiB dump)."""
    values, health = _walk({}, head_next=0x908)
    assert values == []
    assert len(health.broken_walks) == 1


def test_probe_of_an_unreadable_head_is_not_a_broken_walk() -> None:
    """A plugin asking to walk a list at an unreadable address is a probe, counted only."""
    values, health = _walk({}, head_next=0, head=0x900)
    assert values == [] and health.broken_walks == [] and health.faults == 1


def test_null_head_is_an_empty_list() -> None:
    values, health = _walk({}, head_next=0)
    assert values == [] and health.problems() == [] and health.faults == 0


def _grid(rows: list[tuple]) -> renderers.TreeGrid:
    return renderers.TreeGrid([("PID", int), ("File output", str)], ((0, r) for r in rows))


def test_error_cells_are_noticed_through_the_renderer(capsys: pytest.CaptureFixture[str]) -> None:
    from volatility3.cli import text_renderer

    health = RunHealth()
    grid = _grid([(1, "Error outputting file"), (2, "pid.2.dmp")])
    health.watch_grid(grid)
    text_renderer.QuickTextRenderer().render(grid)
    out = capsys.readouterr().out
    assert "Error outputting file" in out and "pid.2.dmp" in out  # the output itself is unchanged
    assert health.error_cells == ["File output: Error outputting file"]
    assert "failure" in health.problems()[0]


def test_unreadable_cells_are_counted_not_errors() -> None:
    from volatility3.cli import text_renderer

    health = RunHealth()
    grid = renderers.TreeGrid([("PID", int), ("ARGS", str)],
                              ((0, r) for r in [(1, renderers.UnreadableValue()), (2, "sh")]))
    health.watch_grid(grid)
    text_renderer.JsonRenderer().render(grid)
    assert health.unreadable_cells == 1 and health.problems() == []


@pytest.mark.parametrize("plugin, words", [
    ("windows.pslist", ["windows.pslist is a Windows plugin", "Linux", "linux.pslist"]),
    ("windows.info.Info", ["Windows plugin", "Linux"]),
    ("mac.bash", ["mac.bash is a macOS plugin", "Linux", "linux.bash"]),
])
def test_other_os_plugin_is_one_clear_line(plugin: str, words: list[str]) -> None:
    with pytest.raises(ShadowvolError) as err:
        run_plugin_cli(["-vm", "no-such-vm", plugin])
    text = str(err.value)
    assert "\n" not in text and "SymbolError" not in text
    for w in words:
        assert w in text


def test_output_dir_not_writable_is_one_line() -> None:
    with pytest.raises(ShadowvolError, match="cannot write files into /proc"):
        run_plugin_cli(["-vm", "no-such-vm", "-o", "/proc", "linux.pslist"])


@pytest.mark.parametrize("plugin, flag", [("linux.vmaregexscan", "--pattern"),
                                          ("linux.module_extract", "--base")])
def test_required_plugin_option_is_named(plugin: str, flag: str) -> None:
    with pytest.raises(ShadowvolError, match=f"required: {flag}"):
        run_plugin_cli(["-vm", "no-such-vm", plugin])


def test_missing_optional_dependency_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowvol import volbridge

    def load(name: str, ours_only: bool = False) -> type:
        raise ModuleNotFoundError("No module named 'yara'", name="yara")
    monkeypatch.setattr(volbridge, "load_plugin", load)
    with pytest.raises(ShadowvolError, match="needs the Python module 'yara'"):
        run_plugin_cli(["-vm", "no-such-vm", "linux.vmayarascan"])
