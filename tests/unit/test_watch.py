"""watch's tick logic on synthetic parts: a smeared look is taken once more in a
new epoch, then reported partial; a boot context forgets an epoch's leftovers
and keeps what a boot fixes (the symbol table and its resolved types)."""

from __future__ import annotations

import io

import pytest
from volatility3.framework.layers.physical import BufferDataLayer
from volatility3.framework.symbols import intermed

from shadowvol.watch import Look, look_twice

ROW = {"PID": 1, "COMM": "init"}


class _Epochs:
    """A fake guest: each look happens in the epoch started before it."""

    def __init__(self, outcomes: list) -> None:
        self.outcomes = outcomes  # per look: an exception to raise, or a Look
        self.epochs = 0
        self.looked_in: list[int] = []

    def new_epoch(self) -> None:
        self.epochs += 1

    def look(self) -> Look:
        self.looked_in.append(self.epochs)
        got = self.outcomes[len(self.looked_in) - 1]
        if isinstance(got, Exception):
            raise got
        return got


def test_a_whole_look_is_taken_once() -> None:
    g = _Epochs([Look([ROW], set())])
    got, partial = look_twice(g.look, g.new_epoch)
    assert got.rows == [ROW] and partial is None and g.looked_in == [1]


def test_a_look_that_raised_is_retried_once_in_a_new_epoch() -> None:
    from volatility3.framework.exceptions import InvalidAddressException

    g = _Epochs([InvalidAddressException("kernel_layer", 0xdead000000000100, "LIST_POISON1"),
                 Look([ROW], set())])
    got, partial = look_twice(g.look, g.new_epoch)
    assert got.rows == [ROW] and partial is None
    assert g.looked_in == [1, 2]  # the second look saw a new epoch


def test_a_look_smeared_twice_is_partial_with_its_rows() -> None:
    g = _Epochs([Look([ROW], set(), "list of task_struct.tasks stopped at unreadable 0x10"),
                 Look([ROW, {"PID": 2, "COMM": "kthreadd"}], set(), "list of task_struct.tasks stopped at 0x20")])
    got, partial = look_twice(g.look, g.new_epoch)
    assert len(got.rows) == 2 and partial == "list of task_struct.tasks stopped at 0x20"
    assert g.looked_in == [1, 2]


def test_a_look_that_raised_twice_has_no_rows() -> None:
    g = _Epochs([ValueError("bad"), KeyError("gone")])
    got, partial = look_twice(g.look, g.new_epoch)
    assert got is None and partial == "KeyError: 'gone'"


def test_partial_changes_are_marked_and_not_a_baseline(monkeypatch) -> None:
    """The watch loop with its guest faked: tick 1 is smeared twice (its '-' is marked
    partial), tick 2 is whole and compared with tick 0, the last whole tick."""
    from shadowvol import watch as w

    looks = iter([Look([ROW, {"PID": 7, "COMM": "sh"}], set()),  # tick 0
                  Look([ROW], set(), "smear"), Look([ROW], set(), "smear"),  # tick 1, looked at twice
                  Look([ROW, {"PID": 7, "COMM": "sh"}, {"PID": 9, "COMM": "new"}], set())])  # tick 2

    class Boot:
        def __init__(self, target) -> None:
            self.target = target
            self.context = self

        def is_current(self, registers) -> bool:
            return True

        def new_epoch(self) -> None:
            self.now = next(looks)

        def look(self, plugin_cls, options, pause) -> Look:
            return self.now

    class Target:
        endpoints = type("Endpoints", (), {"qmp": None})()

        def registers(self) -> None:
            return None

        def alive(self) -> bool:
            return True

        def close(self) -> None:
            pass

    monkeypatch.setattr(w, "_Boot", Boot)
    monkeypatch.setattr("shadowvol.volbridge.load_plugin", lambda name: object)
    monkeypatch.setattr("shadowvol.target.open_target", lambda **kw: Target())
    out, err = io.StringIO(), io.StringIO()
    assert w.watch("fake", "linux.pslist", interval=0.001, count=3, renderer="jsonl", out=out, err=err) == 0
    import json

    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines == [{"PID": 7, "COMM": "sh", "change": "-", "tick": 1, "partial": True},
                     {"PID": 9, "COMM": "new", "change": "+", "tick": 2}]
    assert "tick 1: partial, smeared twice" in err.getvalue()
    # a source without registers (a pid: QEMU with no QMP socket): said once, at start
    assert err.getvalue().count("fake gives no vCPU registers (no QMP socket)") == 1


@pytest.mark.parametrize("spec", ["pid:4242", "qmp:/run/q.sock", "libvirt:dom1", "web01"])
def test_a_reboot_is_seen_through_the_targets_own_registers(monkeypatch, spec: str) -> None:
    """Whatever -vm named the VM (pid:, qmp:, libvirt:, ours), each tick asks the target's own
    monitor for CR3: when it leads elsewhere, the reboot is said once and the kernel located
    again from those registers. Tick 2's CR3 is the new kernel's; at tick 4 the VM is gone.
    (Before, pid: targets had no registers here, and qmp:/libvirt: ones were asked through a
    QMP socket found from the name, none for libvirt.)"""
    from shadowvol import watch as w

    cr3 = iter([0x1000, 0x1000, 0x1000, 0x9000, 0x9000])  # at start, then ticks 0-3
    alive = iter([True, True, True, True, False])  # ticks 0-4

    class Target:
        endpoints = type("E", (), {"qmp": None})()
        location = type("L", (), {"virt_shift": 0x200000})()

        def registers(self):
            return (next(cr3), 0x6f0)

        def alive(self) -> bool:
            return next(alive)

        def close(self) -> None:
            pass

    class Boot:
        def __init__(self, target, dtb: int = 0x1000) -> None:
            self.target, self.dtb, self.context = target, dtb, self

        def is_current(self, registers) -> bool:
            return registers is not None and registers[0] == self.dtb

        def new_epoch(self) -> None:
            pass

        def look(self, plugin_cls, options, pause) -> Look:
            return Look([{"DTB": self.dtb}], set())

    relocated = []

    def relocate(vm, backend, connect, old, state):
        relocated.append(state.registers)
        boot = Boot(old.target, state.registers[0])
        boot.target.location = type("L", (), {"virt_shift": 0x3400000})()
        return boot

    monkeypatch.setattr(w, "_Boot", Boot)
    monkeypatch.setattr(w, "_relocate", relocate)
    monkeypatch.setattr("shadowvol.volbridge.load_plugin", lambda name: object)
    monkeypatch.setattr("shadowvol.target.open_target", lambda **kw: Target())
    out, err = io.StringIO(), io.StringIO()
    assert w.watch(spec, "linux.pslist", interval=0.001, count=10, renderer="jsonl", out=out, err=err) == 0
    said = err.getvalue()
    assert relocated == [(0x9000, 0x6f0)]
    assert said.count("no longer at KASLR shift 0x200000") == 1 and "0x200000 -> 0x3400000" in said
    assert f"VM {spec} has stopped: watch ends after 4 ticks" in said
    assert "gives no vCPU registers" not in said
    import json

    assert [json.loads(x) for x in out.getvalue().splitlines()] == [
        {"DTB": 4096, "change": "-", "tick": 2}, {"DTB": 0x9000, "change": "+", "tick": 2}]


def _linux_isf() -> dict:
    names = ["file", "list_head", "hlist_head", "mm_struct", "super_block", "task_struct", "vm_area_struct",
             "qstr", "dentry", "fs_struct", "files_struct", "kobject", "cred", "inode", "idr", "address_space",
             "page", "vfsmount", "net", "socket", "sock", "inet_sock", "unix_sock"]
    return {
        "metadata": {"format": "6.2.0", "producer": {"name": "test", "version": "0"}},
        "base_types": {"pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
                       "unsigned long": {"kind": "int", "size": 8, "signed": False, "endian": "little"}},
        "user_types": {n: {"kind": "struct", "size": 8, "fields": {
            "x": {"offset": 0, "type": {"kind": "base", "name": "unsigned long"}}}} for n in names},
        "enums": {}, "symbols": {"init_task": {"address": 0xFFFFFFFF81000000}},
    }


def test_a_boot_context_forgets_an_epoch_and_keeps_the_boot() -> None:
    from shadowvol import volbridge
    from shadowvol.backends.base import BufferMemory, Segment
    from shadowvol.kaslr import KernelLocation
    from shadowvol.paging import FOUR_LEVEL, PagedMemory, TranslationCache

    mem = BufferMemory(bytes(0x4000), [Segment(0, 0x4000, 0)])
    paged = PagedMemory(mem, 0x1000, FOUR_LEVEL, TranslationCache(mem))
    boot = volbridge.BootContext(mem, paged, KernelLocation(0x1000, 0, 0, False, "test"), _linux_isf())
    ctx = boot.context
    table = ctx.symbol_space[volbridge.SYMBOL_TABLE]
    task = ctx.symbol_space.get_type(f"{volbridge.SYMBOL_TABLE}!task_struct")
    base_layers = list(ctx.layers)

    def look(tables: int = 0) -> None:  # what a plugin run leaves behind
        ctx.layers.add_layer(BufferDataLayer(ctx, "temporary._P1", "kernel_layer_Process1", b"\0" * 16))
        ctx.config["plugins.PsList.pid"] = [1]
        ctx.layers[volbridge.KERNEL_LAYER].read = lambda *a, **k: b"observed"
        ctx.epoch_cache["boottime"] = 42
        for i in range(tables):  # library_list's ELF tables
            intermed.IntermediateSymbolTable.create(ctx, f"plugins.LibraryList.t{i}", "linux", "elf")

    base_tables = list(ctx.symbol_space)
    look(tables=3)
    assert len(ctx.symbol_space) == len(base_tables) + 3
    epoch = paged.cache.epoch
    boot.clear_plugin_state()  # the next plugin, same moment
    assert list(ctx.symbol_space) == base_tables
    assert list(ctx.layers) == base_layers and "plugins.PsList.pid" not in ctx.config
    assert "read" not in vars(ctx.layers[volbridge.KERNEL_LAYER])
    assert ctx.epoch_cache == {"boottime": 42} and paged.cache.epoch == epoch
    task_again = ctx.symbol_space.get_type(f"{volbridge.SYMBOL_TABLE}!task_struct")
    assert (task_again.vol.type_name, task_again.size, task_again.vol.members.keys()) == \
        (task.vol.type_name, task.size, task.vol.members.keys())  # resolved again: tables were removed
    task = task_again

    look()
    boot.new_epoch()  # the next tick
    assert list(ctx.symbol_space) == base_tables
    assert list(ctx.layers) == base_layers and "plugins.PsList.pid" not in ctx.config
    assert "read" not in vars(ctx.layers[volbridge.KERNEL_LAYER])
    assert ctx.epoch_cache == {} and paged.cache.epoch == epoch + 1
    assert ctx.symbol_space[volbridge.SYMBOL_TABLE] is table  # the boot's table, its types resolved once
    assert ctx.symbol_space.get_type(f"{volbridge.SYMBOL_TABLE}!task_struct") is task
    assert ctx.config[f"shadowvol.kernel.offset"] == 0 and ctx.modules[volbridge.KERNEL_MODULE] is not None
