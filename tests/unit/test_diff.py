"""shadowvol.diff on plugin rows built here: processes and modules."""

from __future__ import annotations

from shadowvol.diff import module_changes, process_changes, render_text


def proc(pid: int, comm: str, ppid: int = 1, uid: int = 0, euid: int = 0, start: str = "t0") -> dict:
    return {"PID": pid, "TID": pid, "PPID": ppid, "COMM": comm, "UID": uid, "GID": 0, "EUID": euid, "EGID": 0,
            "CREATION TIME": start, "OFFSET (V)": 0x1000 + pid}


def test_processes_added_exited_changed() -> None:
    a = [proc(1, "init", 0), proc(50, "sshd"), proc(60, "bash", 50, 1000, 1000), proc(70, "old")]
    b = [proc(1, "init", 0), proc(60, "bash", 50, 1000, 0), proc(70, "new", start="t9"), proc(80, "sleep", 60)]
    rows = process_changes(a, b)
    got = [(r["change"], r["pid"], r["comm"]) for r in rows]
    # pid 70 reused by a new process (another creation time): the old one exited, the new one is added
    assert got == [("removed", 50, "sshd"), ("changed", 60, "bash"), ("removed", 70, "old"),
                   ("added", 70, "new"), ("added", 80, "sleep")]
    changed = rows[1]
    assert changed["before"] == {"euid": 1000} and changed["after"] == {"euid": 0}
    assert rows[-1]["after"]["ppid"] == 60 and rows[-1]["before"] is None
    assert process_changes(a, a) == []


def test_a_comm_or_parent_change_is_a_change() -> None:
    rows = process_changes([proc(9, "sh", 1)], [proc(9, "evil", 2)])
    assert rows == [{"kind": "process", "change": "changed", "pid": 9, "comm": "evil",
                     "before": {"comm": "sh", "ppid": 1}, "after": {"comm": "evil", "ppid": 2}}]


def mod(name: str, offset: int, size: int = 0x4000) -> dict:
    return {"Module Name": name, "Offset": offset, "Code Size": size, "Taints": "", "Load Arguments": ""}


def test_modules_loaded_unloaded_moved() -> None:
    rows = module_changes([mod("a", 0x1000), mod("b", 0x2000)], [mod("b", 0x9000), mod("rk", 0x5000)])
    assert [(r["change"], r["name"]) for r in rows] == [("removed", "a"), ("changed", "b"), ("added", "rk")]
    assert rows[1]["before"] == {"offset": 0x2000} and rows[1]["after"] == {"offset": 0x9000}
    text = render_text(rows)
    assert "module   added    name=rk" in text and "offset=0x2000 -> offset=0x9000" in text
    assert render_text([]) == ""


def test_syscall_hook_and_set_like_kinds() -> None:
    from shadowvol.diff import KINDS, kind_changes

    def sc(i: int, target: int, sym: str, owner: str = "kernel") -> dict:
        return {"Check": "sys_call_table", "Index": i, "Syscall": f"s{i}", "Address": 0x100 + 8 * i,
                "Expected": 0x1000 + i, "Target": target, "Symbol": sym, "Owner": owner, "Hooked": owner != "kernel"}

    rows = kind_changes(KINDS["syscall"], [sc(0, 0x1000, "read"), sc(1, 0x1001, "write")],
                        [sc(0, 0x1000, "read"), sc(1, 0xBAD, "UNKNOWN", "rk")])
    assert rows == [{"kind": "syscall", "change": "changed", "check": "sys_call_table", "number": 1,
                     "syscall": "s1", "before": {"target": 0x1001, "symbol": "write", "owner": "kernel",
                                                 "hooked": False},
                     "after": {"target": 0xBAD, "symbol": "UNKNOWN", "owner": "rk", "hooked": True}}]
    hook = {"Callback": "rk_cb", "Callback address": 0x5, "Hooked symbols": "sys_kill", "Module": "rk",
            "Module address": 0x9, "ftrace_ops address": 0x7}
    rows = kind_changes(KINDS["ftrace"], [], [hook])
    assert [(r["change"], r["callback"], r["hooked"], r["module"]) for r in rows] == [
        ("added", "rk_cb", "sys_kill", "rk")]
    assert kind_changes(KINDS["ftrace"], [hook], [dict(hook)]) == []


class _Kernel:
    """Kernel text at ``base``: two pages in two physical runs, the rest unmapped."""

    def __init__(self, base: int) -> None:
        self.base = base

    def mapping(self, vaddr: int, length: int, ignore_errors: bool = False):
        assert ignore_errors and vaddr == self.base
        yield self.base, 0x1000, 0x9000  # frames out of order: a run per frame
        yield self.base + 0x1000, 0x1000, 0x5000


class _Memory:
    def __init__(self, text: bytearray) -> None:
        self.phys = {0x9000: bytes(text[:0x1000]), 0x5000: bytes(text[0x1000:0x2000])}

    def read(self, paddr: int, length: int) -> bytes:
        return self.phys[paddr][:length]


class _Target:
    def __init__(self, text: bytearray, shift: int) -> None:
        from types import SimpleNamespace

        self.isf = {"symbols": {"_stext": {"address": 0x1000}, "_etext": {"address": 0x3800},
                                "foo": {"address": 0x1000}, "bar": {"address": 0x2010}}}
        self.location = SimpleNamespace(virt_shift=shift)
        self.kernel = _Kernel(0x1000 + shift)
        self.memory = _Memory(text)

    def symbol_address(self, name: str) -> int:
        return self.isf["symbols"][name]["address"] + self.location.virt_shift


def test_kernel_text_pages_are_hashed_and_named() -> None:
    from shadowvol.diff import KINDS, kernel_text_rows, kind_changes

    text = bytearray(range(256)) * 32
    before = kernel_text_rows(_Target(text, 0x200000))
    assert [(r["Offset"], r["Symbol"]) for r in before] == [(0, "foo+0x0"), (0x1000, "foo+0x1000"),
                                                             (0x2000, "bar+0xff0")]
    assert before[2]["SHA256"] == "unmapped"
    text[0x1100] ^= 0xFF  # a patched byte in the second page, another KASLR slide
    rows = kind_changes(KINDS["text"], before, kernel_text_rows(_Target(text, 0x400000)))
    assert [(r["change"], r["offset"], r["symbol"]) for r in rows] == [("changed", 0x1000, "foo+0x1000")]


def test_text_pages_are_hashed_from_their_runs_and_only_changes_named() -> None:
    import hashlib

    from shadowvol.diff import KINDS, kernel_text_hashes, kind_changes, name_text_rows

    text = bytearray(range(256)) * 32
    before = kernel_text_hashes(_Target(text, 0))
    assert before == [{"Offset": 0, "SHA256": hashlib.sha256(text[:0x1000]).hexdigest()},
                      {"Offset": 0x1000, "SHA256": hashlib.sha256(text[0x1000:0x2000]).hexdigest()},
                      {"Offset": 0x2000, "SHA256": "unmapped"}]
    text[0x10] ^= 1
    changes = kind_changes(KINDS["text"], before, kernel_text_hashes(_Target(text, 0x600000)))
    assert [(r["change"], r["offset"]) for r in changes] == [("changed", 0)]
    name_text_rows(_Target(text, 0).isf, changes, column="offset")
    assert changes[0]["Symbol"] == "foo+0x0"
