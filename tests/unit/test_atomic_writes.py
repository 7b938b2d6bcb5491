"""Issue 9: every file shadowvol writes is written atomically.

The rule is checked on the source with ``ast`` (as tests/unit/test_architecture.py
checks the layers): outside ``shadowvol/safeio.py`` no module of the package
opens a file for writing, writes a path's text or bytes, or copies a file
with ``shutil``; writes go through ``safeio.AtomicFile`` (temp file in the
same directory, fsync, rename) or the helpers built on it. The only other
``O_CREAT`` allowed is a lock file (no data in it). What other programs write
(QEMU's console log, apt and dpkg) is documented in safeio's docstring.

Then the helpers themselves and the ``-o`` file handler, on real files.
"""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from shadowvol.errors import ShadowvolError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "shadowvol").rglob("*.py"), *(ROOT / "kvm_module").rglob("*.py")])
HELPER = ROOT / "shadowvol" / "safeio.py"

PATH_WRITES = {"write_text", "write_bytes", "touch"}
SHUTIL_COPIES = {"copy", "copy2", "copyfile", "copyfileobj", "move"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}


def _const(node: ast.AST | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _writes_mode(mode: ast.AST | None, default: str = "r") -> bool:
    """A file mode that writes (or one not spelled out: assumed to)."""
    if mode is None:
        return any(c in default for c in "wax+")
    value = _const(mode)
    return not isinstance(value, str) or any(c in value for c in "wax+")


def _mode_arg(call: ast.Call, pos: int) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value
    return call.args[pos] if len(call.args) > pos else None


def non_atomic_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every write that bypasses safeio in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
        what = None
        if isinstance(f, ast.Name) and name == "open" and _writes_mode(_mode_arg(node, 1)):
            what = "open() for writing"
        elif name == "open" and owner in ("io", "gzip", "lzma", "bz2", "tarfile", "zipfile", "codecs") \
                and _writes_mode(_mode_arg(node, 1)):
            what = f"{owner}.open() for writing"
        elif name == "open" and owner not in ("os", "io", "gzip", "lzma", "bz2", "tarfile", "zipfile",
                                              "codecs", "mmap") and node.args[:1] and \
                isinstance(_const(node.args[0]), str) and _writes_mode(node.args[0]):
            what = "Path.open() for writing"
        elif name == "fdopen" and _writes_mode(_mode_arg(node, 1)):
            what = "os.fdopen() for writing"
        elif name in PATH_WRITES and isinstance(f, ast.Attribute):
            what = f".{name}()"
        elif owner == "shutil" and name in SHUTIL_COPIES:
            what = f"shutil.{name}()"
        elif owner == "shutil" and name == "copytree" and not any(k.arg == "copy_function" for k in node.keywords):
            what = "shutil.copytree() without copy_function=atomic_copy"
        elif owner == "os" and name == "open" and len(node.args) > 1:
            flags = {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            if flags & WRITE_FLAGS and "lock" not in ast.unparse(node.args[0]).lower():
                what = "os.open() for writing (not a lock file)"
        if what:
            found.append((node.lineno, what))
    return found


def test_the_rule_sees_every_kind_of_write() -> None:
    """The detector itself: each way to write a file is caught, reads are not."""
    bad = """
open(p, "w"); open(p, mode="ab"); open(p, m); Path(p).open("w"); p.write_text("x"); p.write_bytes(b"")
shutil.copy(a, b); shutil.copy2(a, b); shutil.copyfile(a, b); shutil.copytree(a, b)
os.open(p, os.O_WRONLY | os.O_CREAT, 0o600); os.fdopen(fd, "wb"); lzma.open(p, "wb"); p.touch()
"""
    good = """
open(p); open(p, "rb"); p.read_text(); os.open(p, os.O_RDONLY); Path(p).open("rb")
os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600); shutil.copytree(a, b, copy_function=atomic_copy)
shutil.rmtree(d); os.replace(a, b); tarfile.open(p)
"""
    assert len(non_atomic_writes(ast.parse(bad))) == 14
    assert non_atomic_writes(ast.parse(good)) == []


@pytest.mark.parametrize("path", [p for p in SOURCES if p != HELPER], ids=lambda p: str(p.relative_to(ROOT)))
def test_package_writes_only_through_safeio(path: Path) -> None:
    found = non_atomic_writes(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    assert not found, (f"{path.relative_to(ROOT)} writes without shadowvol.safeio "
                       f"(use atomic_write / atomic_copy / atomic_file): {found}")


# -- the helpers, on real files ---------------------------------------------------------------------

def test_atomic_file_discards_on_error(tmp_path: Path) -> None:
    from shadowvol.safeio import atomic_file

    f = tmp_path / "out.raw"
    f.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(f) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("the copy failed half way")
    assert f.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.raw"]
    with atomic_file(f, 0o640) as fh:
        os.pwrite(fh.fileno(), b"new", 0)
    assert f.read_bytes() == b"new" and stat.S_IMODE(f.stat().st_mode) == 0o640


def test_no_replace_and_unique_names(tmp_path: Path) -> None:
    from shadowvol.safeio import AtomicFile, atomic_write

    f = tmp_path / "a.json"
    atomic_write(f, b"1", replace=False)
    with pytest.raises(ShadowvolError, match="exists: not overwritten"):
        atomic_write(f, b"2", replace=False)
    assert f.read_bytes() == b"1"
    names = []
    for data in (b"2", b"3"):
        af = AtomicFile(f)
        af.file.write(data)
        names.append(af.commit(replace=False, unique=True).name)
    assert names == ["a-1.json", "a-2.json"] and (tmp_path / "a-2.json").read_bytes() == b"3"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_copy_keeps_the_mode_and_refuses_a_fifo(tmp_path: Path) -> None:
    from shadowvol.safeio import atomic_copy

    src = tmp_path / "busybox"
    src.write_bytes(os.urandom(3 << 20))
    os.chmod(src, 0o755)
    dst = atomic_copy(src, tmp_path / "copy")
    assert dst.read_bytes() == src.read_bytes() and stat.S_IMODE(dst.stat().st_mode) == 0o755
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ShadowvolError, match="FIFO"):
        atomic_copy(fifo, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_output_dir_handler_is_all_or_nothing(tmp_path: Path) -> None:
    """``-o DIR``: a file a plugin wrote whole appears (0600, vol's -1 naming);
    one whose ``with`` block failed, or never closed, leaves nothing."""
    from shadowvol.run import file_handler

    handler = file_handler(str(tmp_path))
    with handler("pid.1.dmp") as fh:
        fh.write(b"ELF" * 1000)
    second = handler("pid.1.dmp")
    second.write(b"again")
    second.close()
    assert second.preferred_filename == "pid.1-1.dmp"  # what the plugin prints in its row
    with pytest.raises(ValueError):
        with handler("pid.2.dmp") as fh:
            fh.write(b"half")
            raise ValueError("unreadable page")
    never = handler("pid.3.dmp")
    never.write(b"left open")
    assert handler.discard_unclosed() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pid.1-1.dmp", "pid.1.dmp"]
    assert (tmp_path / "pid.1.dmp").read_bytes() == b"ELF" * 1000
    assert stat.S_IMODE((tmp_path / "pid.1.dmp").stat().st_mode) == 0o600
