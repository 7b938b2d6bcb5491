"""Issue 9 probes on files, flags and messages: each a regression test."""

from __future__ import annotations

import json
import os
import stat
import struct
import sys
from pathlib import Path

import pytest

from shadowvol.errors import BackendError, ProfileError, ShadowvolError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzz_parsers as fz  # noqa: E402


@pytest.fixture()
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var, sub in (("SHADOWVOL_RUN", "run"), ("SHADOWVOL_SHM", "shm"), ("SHADOWVOL_CACHE", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("SHADOWVOL_PROFILE_DIR", raising=False)
    return tmp_path


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from shadowvol.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


# -- inputs: stat before open ---------------------------------------------------------

@pytest.mark.parametrize("flag", ["-f", "--profile"])
def test_fifo_device_directory_refused(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       private: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, word in ((fifo, "FIFO"), ("/dev/zero", "device"), (tmp_path, "directory")):
        argv = (["-f", str(path)] if flag == "-f" else ["-vm", "web01", "--profile", str(path)]) + ["linux.pslist"]
        rc, err = cli(argv, capsys)
        assert rc == 1 and word in err and err.count("\n") == 1, err


def test_profile_build_inputs_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv, word in ((["--vmlinuz", str(fifo)], "FIFO"), (["--vmlinuz", "/dev/zero"], "device"),
                       (["--vmlinux", str(tmp_path)], "directory"),
                       (["--vmlinuz", "/etc/hostname", "--system-map", str(fifo)], "FIFO"),
                       (["--vmlinuz", "/etc/hostname", "--headers", "/etc/hostname"], "not a directory")):
        rc, err = cli(["profile", "build", *argv], capsys)
        assert rc == 1 and word in err, err


def test_read_input_is_bounded_by_size(tmp_path: Path) -> None:
    from shadowvol.safeio import InputError, read_input

    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert read_input(f, "x") == b"abc"
    with pytest.raises(InputError, match="more than"):
        read_input(f, "x", limit=2)


def test_map_file_readonly_refuses_fifo(tmp_path: Path) -> None:
    from shadowvol.backends.base import map_file_readonly

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BackendError, match="FIFO"):
        map_file_readonly(str(fifo), "dump")


# -- messages -----------------------------------------------------------------------------

def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli(["frobnicate"], capsys)
    assert rc == 1 and "unknown command 'frobnicate'" in err


def test_long_vm_name_not_echoed(capsys: pytest.CaptureFixture[str], private: Path) -> None:
    rc, err = cli(["vm", "stop", "a" * 100_000], capsys)
    assert rc == 1 and "invalid VM name" in err and len(err) < 300


def test_cpus_zero_refused_before_booting(capsys: pytest.CaptureFixture[str], private: Path) -> None:
    rc, err = cli(["vm", "start", "x", "--cpus", "0"], capsys)
    assert rc == 1 and "--cpus" in err and "booting" not in err


# -- files ----------------------------------------------------------------------------------

def test_stale_entry_never_unlinks_outside_files(private: Path) -> None:
    from shadowvol import paths
    from shadowvol.vm import registry

    victim = private / "victim"
    victim.write_text("precious")
    inside = paths.shm_dir() / "web09.ram"
    inside.write_text("ram")
    link = paths.shm_dir() / "link.ram"
    link.symlink_to(victim)
    for name, ram in (("web09", str(victim)), ("web10", str(paths.shm_dir() / ".." / "victim")),
                      ("web11", str(link)), ("web12", str(inside))):
        d = registry.vm_dir(name)
        d.mkdir(parents=True)
        (d / "vm.json").write_text(json.dumps({
            "name": name, "pid": 1, "release": "r", "memory_mb": 1, "cpus": 1, "accel": "tcg", "kaslr": True,
            "stub": False, "dir": str(d), "ram_file": ram, "qmp": "", "gdb": "", "ctl": "", "console": "",
            "console_log": "", "image": "", "started": 0.0}))
    with pytest.raises(ShadowvolError, match="not running"):
        registry.get_vm("web09")
    registry.list_vms()
    assert victim.read_text() == "precious"
    assert not inside.exists()  # ours, inside our shm dir: removed
    assert not list(registry.vms_dir().iterdir())


def test_private_dirs_enforced_on_every_use(private: Path) -> None:
    from shadowvol import paths, profiles

    cache = paths.cache_dir()
    os.chmod(cache, 0o755)
    store = profiles.store_dir()
    os.chmod(store, 0o755)
    assert stat.S_IMODE(paths.cache_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(profiles.store_dir().stat().st_mode) == 0o700
    os.chmod(paths.run_dir(), 0o755)
    assert stat.S_IMODE(paths.run_dir().stat().st_mode) == 0o700


def test_restrict_modes(private: Path) -> None:
    from shadowvol.vm import qemu, registry

    # "log" is the console log QEMU streams to; qemu.log (-D) and qemu.pid are QEMU's too
    files = {k: private / k for k in ("ram", "qmp", "gdb", "ctl", "con", "log", "qemu.log", "qemu.pid")}
    for f in files.values():
        f.write_text("")
        os.chmod(f, 0o640)
    e = registry.VMEntry(name="x", pid=0, release="", memory_mb=1, cpus=1, accel="tcg", kaslr=True, stub=False,
                         dir=str(private), ram_file=str(files["ram"]), qmp=str(files["qmp"]), gdb=str(files["gdb"]),
                         ctl=str(files["ctl"]), console=str(files["con"]), console_log=str(files["log"]),
                         image="", started=0.0)
    qemu._restrict_modes(e)
    assert {stat.S_IMODE(f.stat().st_mode) for f in files.values()} == {0o600}


def test_atomic_write_leaves_old_file_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowvol.safeio import atomic_write

    f = tmp_path / "p.json"
    atomic_write(f, b"old")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(ShadowvolError, match="No space"):
        atomic_write(f, b"new")
    assert f.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_output_into_missing_directory(tmp_path: Path) -> None:
    from shadowvol.symbols import write_profile

    with pytest.raises(ShadowvolError, match="cannot write"):
        write_profile(fz.isf_seed(), tmp_path / "missing" / "x.json")
    with pytest.raises(ShadowvolError, match="cannot write"):
        write_profile(fz.isf_seed(), Path("/proc/x.json"))


def test_plugin_output_into_missing_or_proc_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's probe: -o into /proc or a missing directory was an internal error."""
    for out, word in ((str(tmp_path / "missing"), "does not exist (-o DIR)"), ("/proc", "cannot write files into /proc")):
        rc, err = cli(["-vm", "no-such-vm", "-o", out, "linux.pslist"], capsys)
        assert rc == 1 and word in err and len(err.strip().splitlines()) == 1, err


# -- nothing remembered implicitly ---------------------------------------------------------

def _isf_with(typed: int, untyped: int = 3) -> dict:
    isf = fz.isf_seed()
    syms = {f"t{i}": {"address": i, "type": {"kind": "base", "name": "int"}} for i in range(typed)}
    syms.update({f"u{i}": {"address": i} for i in range(untyped)})
    isf["symbols"] = {**isf["symbols"], **syms}
    return isf


def test_profile_build_never_degrades_the_store(private: Path) -> None:
    from shadowvol import profiles
    from shadowvol.cli import _refuse_degrading

    stored = profiles.write_profile(_isf_with(50), "linux-6.1.0-test")
    with pytest.raises(ShadowvolError, match="would lose the types of"):
        _refuse_degrading(stored, _isf_with(10), force=False)
    _refuse_degrading(stored, _isf_with(10), force=True)
    _refuse_degrading(stored, _isf_with(60), force=False)


def test_profile_flag_is_not_remembered(private: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from shadowvol import target as tg
    from shadowvol.backends.base import BufferMemory, Segment
    mem = BufferMemory(bytes(1 << 16), [Segment(0, 1 << 16, 0)])
    state = tmp_path / "vmstate"
    state.mkdir()
    src = tg._Source(mem, "vm:test", state_dir=state, boot_key="1:2")
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(fz.isf_seed()))
    monkeypatch.setattr(tg, "_locate", lambda *a, **k: None)
    monkeypatch.setattr(tg, "Target", lambda *a, **k: ("target", a))
    tg._resolve(src, str(prof), lambda m: None)
    assert not (state / "kernel.json").exists()


# -- guest-derived text never becomes a path ---------------------------------------------------

def test_guest_profile_named_by_hash(private: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowvol import profiles
    from shadowvol import target as tg
    from shadowvol.symbols import live

    isf = fz.isf_seed()
    isf["metadata"]["linux"] = {"types": [{"kind": "dwarf", "name": live.GUEST_BTF_NAME,
                                           "hash_type": "sha256", "hash_value": "ab" * 32}]}

    def fake(memory: object, info: object, report: object) -> dict:
        report.release = "6.1/../../../x"  # type: ignore[attr-defined]
        return isf

    monkeypatch.setattr(live, "profile_from_memory", fake)
    path = tg._profile_from_guest(tg._Source(None, "dump:x"), {"OSRELEASE": "6.1/../../../x"},  # type: ignore[arg-type]
                                  lambda m: None)
    assert path.parent == profiles.store_dir() and path.name.startswith("guest-") and ".." not in path.name
    assert tg.guest_btf_hash(profiles.load_profile(path)) == "ab" * 32
    with pytest.raises(ProfileError):
        profiles.write_profile(isf, "../x")


def test_guest_profile_is_reused_only_for_a_guest_with_the_same_btf(private: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile built from some guest's memory is never picked by banner alone: the
    next target's own BTF (at __start_BTF, through its page tables) must hash the same."""
    import hashlib
    from types import SimpleNamespace

    from shadowvol import profiles
    from shadowvol import target as tg
    from shadowvol.symbols import live

    btf = fz.btf_seed()
    isf = fz.isf_seed()
    isf["symbols"]["__start_BTF"] = {"address": 0xFFFFFFFF82800000}
    isf["metadata"]["linux"] = {"types": [{"kind": "dwarf", "name": live.GUEST_BTF_NAME, "hash_type": "sha256",
                                           "hash_value": hashlib.sha256(btf).hexdigest()}]}
    stored = profiles.write_profile(isf, "guest-0123456789abcdef-01234567")
    banner = profiles.profile_banner(isf)

    def guest_with(blob: bytes) -> SimpleNamespace:
        def read(addr: int, n: int) -> bytes:
            off = addr - 0xFFFFFFFF82800000
            return blob[off:off + n].ljust(n, b"\0") if 0 <= off < len(blob) else b"\0" * n
        return SimpleNamespace(read=read)

    seen: list[bytes] = []

    from shadowvol.kaslr import KernelLocation

    class FakeTarget(tg.Target):
        """The real Target (its symbol API), guest memory read as the kernel's, no KASLR shift."""

        def __post_init__(self) -> None:
            self.kernel = self.memory
            self.location = KernelLocation(0, 0, 0, False, "test")

    monkeypatch.setattr(tg, "Target", FakeTarget)
    monkeypatch.setattr(tg, "_locate", lambda *a, **k: seen.append(b"located") or None)
    same = tg._Source(guest_with(btf), "dump:same")  # type: ignore[arg-type]
    other = tg._Source(guest_with(btf[:-1] + bytes([btf[-1] ^ 1])), "dump:other")  # type: ignore[arg-type]
    assert tg._stored_profile(other, banner, None, lambda m: None) is None
    found = tg._stored_profile(same, banner, None, lambda m: None)
    assert found is not None and found[0] == stored
    assert seen == [b"located", b"located"]  # each candidate located and verified, not taken on trust


# -- truncated dumps -------------------------------------------------------------------------------

def test_truncated_lime_and_elf(tmp_path: Path) -> None:
    from shadowvol.backends.dump import open_dump

    for name, data in (("d.lime", fz.lime_seed()), ("d.elf", fz.elfdump_seed())):
        f = tmp_path / name
        f.write_bytes(data[:-100])
        with pytest.raises(BackendError, match="truncated dump .*--partial"):
            open_dump(f)
        with open_dump(f, partial=True) as d:
            assert d.truncated and "truncated" in d.truncated[0]
            assert d.ranges()
