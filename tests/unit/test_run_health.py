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


# -- beyond list_head: NULL links, maple trees, XArray/radix trees (IDR), red-black trees --------

def test_null_link_inside_a_circular_list_is_reported() -> None:
    """A circular list_head never holds NULL past its head: the stock walk
    ``break``s there quietly; two of however many items were listed."""
    values, health = _walk({0x200: 0x308, 0x300: 0}, head_next=0x208)
    assert values == [2, 3]
    assert health.broken_walks == ["list of item.link at 0x100 stopped at a NULL link at 0x308 (a circular list)"]
    assert health.faults == 0  # nothing unreadable: only the link is wrong


def _tree_ctx(mem: bytearray, isf_types: dict, classes: dict, with_kernel: bool = False):
    ctx = contexts.Context()
    ctx.layers.add_layer(Holed(ctx, "t.layer", "mem", bytes(mem)))
    isf = _isf()
    isf["base_types"]["unsigned int"] = {"kind": "int", "size": 4, "signed": False, "endian": "little"}
    isf["base_types"]["void"] = {"kind": "void", "size": 0, "signed": False, "endian": "little"}
    isf["user_types"].update(isf_types)
    ctx.symbol_space.append(PreloadedISF(ctx, "t.sym", "tbl", "file:///t", isf=isf, class_types=classes))
    if with_kernel:
        ctx.config["t.kernel.layer_name"] = "mem"
        ctx.config["t.kernel.offset"] = 0
        ctx.config["t.kernel.symbol_table_name"] = "tbl"
        ctx.add_module(contexts.Module(ctx, "t.kernel", "kernel"))
    health = RunHealth()
    health.watch_layer(ctx.layers["mem"])
    return ctx, health


VOIDP = {"kind": "pointer", "subtype": {"kind": "base", "name": "void"}}


def _ptr_array(count: int) -> dict:
    return {"kind": "array", "count": count, "subtype": VOIDP}


MAPLE = {
    "maple_tree": {"kind": "struct", "size": 16, "fields": {
        "ma_flags": {"offset": 0, "type": {"kind": "base", "name": "unsigned int"}},
        "ma_root": {"offset": 8, "type": VOIDP}}},
    "maple_range_64": {"kind": "struct", "size": 256, "fields": {
        "parent": {"offset": 0, "type": VOIDP},
        "slot": {"offset": 128, "type": _ptr_array(16)}}},
    "maple_node": {"kind": "struct", "size": 256, "fields": {
        "parent": {"offset": 0, "type": VOIDP},
        "mr64": {"offset": 0, "type": {"kind": "struct", "name": "maple_range_64"}}}},
}
LEAF, RANGE = 1, 2


def _mte(node: int, kind: int) -> int:
    return node | (kind << 3) | 2


def _maple(leaf_c: int, leaf_c_parent: int | None = None) -> tuple[list[int], RunHealth, BaseException | None]:
    """A two-level maple tree at 0x100 (root range node 0x400, leaves 0x500 and ``leaf_c``)
    holding VMA pointers 0x7a0, 0x7a8 | 0x7b0 (the layer masks pointers to 12 bits); what
    stock get_slot_iter yields."""
    mem = bytearray(0x1000)
    struct.pack_into("<IIQ", mem, 0x100, 2 << 2, 0, _mte(0x400, RANGE))  # height 2
    struct.pack_into("<Q", mem, 0x400, 0x100 | 1)
    struct.pack_into("<QQ", mem, 0x400 + 128, _mte(0x500, LEAF), _mte(leaf_c, LEAF))
    for node, vmas in ((0x500, (0x7a0, 0x7a8)), (leaf_c, (0x7b0,))):
        if node + 256 <= HOLE:
            struct.pack_into("<Q", mem, node, (0x400 if node != leaf_c or leaf_c_parent is None
                                               else leaf_c_parent) | 6)
            struct.pack_into(f"<{len(vmas)}Q", mem, node + 128, *vmas)
    ctx, health = _tree_ctx(mem, MAPLE, {"maple_tree": extensions.maple_tree})
    got: list[int] = []
    error = None
    try:
        for slot in ctx.object("tbl!maple_tree", "mem", 0x100).get_slot_iter():
            got.append(int(slot))
    except Exception as exc:  # noqa: BLE001 - what stock does with it is the plugin's business
        error = exc
    return got, health, error


def test_intact_maple_tree_is_healthy() -> None:
    got, health, error = _maple(0x600)
    assert got == [0x7a0, 0x7a8, 0x7b0] and error is None
    assert health.broken_walks == [] and health.problems() == []


def test_maple_node_with_a_foreign_parent_is_reported() -> None:
    """Stock skips the subtree (``return None``): 2 of 3 VMAs, no error."""
    got, health, error = _maple(0x600, leaf_c_parent=0x700)
    assert got == [0x7a0, 0x7a8] and error is None
    assert health.broken_walks == ["maple tree at 0x100: node 0x600 has parent 0x700, reached from 0x400"]


def test_unreadable_maple_node_is_reported() -> None:
    got, health, error = _maple(0x900)
    assert got == [0x7a0, 0x7a8]
    assert health.broken_walks == ["maple tree at 0x100: node 0x900 unreadable at 0x900"]


XA = {
    "xarray": {"kind": "struct", "size": 16, "fields": {
        "xa_head": {"offset": 8, "type": VOIDP}}},
    "xa_node": {"kind": "struct", "size": 48, "fields": {
        "shift": {"offset": 0, "type": {"kind": "base", "name": "unsigned int"}},
        "slots": {"offset": 16, "type": _ptr_array(4)}}},
}


def _xarray(node: int, slots: tuple[int, ...] = (0x7c0, 0, 0x7d0, 0x7e0)) -> tuple[list[int], RunHealth]:
    """An XArray at 0x100 whose head is the internal node ``node`` with 4 slots."""
    mem = bytearray(0x1000)
    struct.pack_into("<QQ", mem, 0x100, 0, node | 2)
    if node + 48 <= HOLE:
        struct.pack_into("<I", mem, node, 0)
        struct.pack_into("<4Q", mem, node + 16, *slots)
    elif node < HOLE:  # the node straddles the hole: its last slots are missing
        struct.pack_into("<I", mem, node, 0)
        struct.pack_into(f"<{(HOLE - node - 16) // 8}Q", mem, node + 16, *slots[:(HOLE - node - 16) // 8])
    ctx, health = _tree_ctx(mem, XA, {}, with_kernel=True)
    from volatility3.framework.symbols import linux

    storage = linux.XArray(ctx, "kernel")
    return [int(e) for e in storage.get_entries(ctx.object("tbl!xarray", "mem", 0x100))], health


def test_intact_xarray_is_healthy() -> None:
    got, health = _xarray(0x400)
    assert got == [0x7c0, 0x7d0, 0x7e0] and health.problems() == []


def test_xarray_slot_past_the_end_is_reported() -> None:
    """Stock ``continue``s over slots it cannot read (pidhashtable, ebpf, the page cache)."""
    got, health = _xarray(HOLE - 32)  # slots 2 and 3 lie in the hole
    assert got == [0x7c0]
    assert health.broken_walks == [f"radix tree/XArray node {HOLE - 32:#x}: slot {n} unreadable at {HOLE + 8 * (n - 2):#x}"
                                   for n in (2, 3)]


def test_unreadable_xarray_head_is_reported() -> None:
    got, health = _xarray(0x900)
    assert got == []
    assert health.broken_walks == ["radix tree/XArray at 0x100: head node unreadable at 0x902"]  # as tagged


RB = {
    "rb_root": {"kind": "struct", "size": 8, "fields": {
        "rb_node": {"offset": 0, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "rb_node"}}}}},
    "rb_node": {"kind": "struct", "size": 24, "fields": {
        "__rb_parent_color": {"offset": 0, "type": {"kind": "base", "name": "unsigned long"}},
        "rb_right": {"offset": 8, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "rb_node"}}},
        "rb_left": {"offset": 16, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "rb_node"}}}}},
}


def _rbtree(right: int) -> tuple[list[int], RunHealth]:
    mem = bytearray(0x1000)
    struct.pack_into("<Q", mem, 0x100, 0x200)
    struct.pack_into("<QQQ", mem, 0x200, 0, right, 0x300)  # root: right child ``right``, left 0x300
    struct.pack_into("<QQQ", mem, 0x300, 0x200, 0, 0)
    if right + 24 <= HOLE:
        struct.pack_into("<QQQ", mem, right, 0x200, 0, 0)
    ctx, health = _tree_ctx(mem, RB, {"rb_root": extensions.rb_root})
    return [int(n) for n in ctx.object("tbl!rb_root", "mem", 0x100).get_nodes()], health


def test_rbtree_child_unreadable_is_reported() -> None:
    got, health = _rbtree(0x400)
    assert got == [0x200, 0x300, 0x400] and health.problems() == []
    got, health = _rbtree(0x900)
    assert got == [0x200, 0x300]
    assert health.broken_walks == ["red-black tree at 0x100: node unreadable at 0x900"]


def test_maple_cycle_said_only_in_a_log_warning_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    """Both slots of the root lead to one leaf: stock walks it once and, for the
    second, only logs a warning (hidden unless -v) and skips it."""
    import logging

    mem = bytearray(0x1000)
    struct.pack_into("<IIQ", mem, 0x100, 2 << 2, 0, _mte(0x400, RANGE))
    struct.pack_into("<Q", mem, 0x400, 0x100 | 1)
    struct.pack_into("<QQ", mem, 0x400 + 128, _mte(0x500, LEAF), _mte(0x500, LEAF))
    struct.pack_into("<Q", mem, 0x500, 0x400 | 6)
    struct.pack_into("<Q", mem, 0x500 + 128, 0x7a0)
    ctx, health = _tree_ctx(mem, MAPLE, {"maple_tree": extensions.maple_tree})
    logger = logging.getLogger(RunHealth.LOGGER)
    logging.getLogger("volatility3").setLevel(logging.ERROR)  # as quiet_volatility: warnings hidden
    try:
        with caplog.at_level(logging.DEBUG, logger="nobody"), health.watching_log():
            got = [int(s) for s in ctx.object("tbl!maple_tree", "mem", 0x100).get_slot_iter()]
        assert logger.level == logging.NOTSET and not logger.filters  # restored
    finally:
        logging.getLogger("volatility3").setLevel(logging.NOTSET)
    assert got == [0x7a0]
    assert health.broken_walks == [f"maple tree: a node reached twice (a cycle), its subtree skipped: "
                                   f"mte {_mte(0x500, LEAF):#x} has all ready been seen"]
    assert not [r for r in caplog.records if "all ready" in r.getMessage()]  # not shown: no -v
