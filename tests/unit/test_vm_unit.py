"""Pure logic of the VM tooling: names, sizes, the cpio writer."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, strategies as st

from shadowvol.errors import VMError
from shadowvol.vm.image import CpioWriter
from shadowvol.vm.qemu import parse_memory
from shadowvol.vm.registry import validate_name


@pytest.mark.parametrize("name", ["web01", "a", "A-b_c9", "x" * 32])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "x" * 33, "a b", "web01\n", "é"])
def test_invalid_names(name):
    with pytest.raises(VMError, match="invalid VM name"):
        validate_name(name)


@given(st.text(max_size=40))
def test_accepted_names_are_safe_path_components(name):
    try:
        validate_name(name)
    except VMError:
        return
    assert "/" not in name and name not in (".", "..") and not name.startswith((".", "-"))


@pytest.mark.parametrize("text,mib", [("512M", 512), ("1G", 1024), ("768", 768), ("2GiB", 2048)])
def test_parse_memory(text, mib):
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["lots", "12", "-5M", "1T"])
def test_parse_memory_rejects(text):
    with pytest.raises(VMError):
        parse_memory(text)


def test_cpio_writer_roundtrip_with_cpio_tool(tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 3)
    (src / "bin/tool").chmod(0o755)
    (src / "bin/link").symlink_to("tool")
    (src / "etc").mkdir()
    (src / "etc/odd").write_bytes(b"x" * 5)
    w = CpioWriter()
    w.add_tree(src)
    archive = w.finish()
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=out, check=True)
    assert (out / "bin/tool").read_bytes() == (src / "bin/tool").read_bytes()
    assert (out / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (out / "bin/link").is_symlink() and (out / "bin/link").readlink().as_posix() == "tool"
    assert (out / "etc/odd").read_bytes() == b"xxxxx"


def test_image_without_stub_says_why(tmp_path):
    """A stub that could not be built is recorded, not fatal (issue 10)."""
    import json

    from shadowvol.vm.image import Image

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"stub": False, "stub_error": "building module in guest_stub failed: x.c:1: error: y"}))
    msg = Image("6.12.117+deb12-cloud-amd64", tmp_path).stub_unavailable()
    assert msg == ("the guest stub is unavailable on kernel 6.12.117+deb12-cloud-amd64: "
                   "building module in guest_stub failed: x.c:1: error: y")
    (tmp_path / "manifest.json").write_text(json.dumps({"stub": True}))
    assert Image("r", tmp_path).stub_unavailable() is None
