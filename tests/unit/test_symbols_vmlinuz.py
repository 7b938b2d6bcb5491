"""vmlinuz payload extraction on bzImages built here."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess

import pytest

from shadowvol.errors import ProfileError
from shadowvol.symbols.vmlinuz import extract_vmlinux

ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def fake_bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    """A boot sector + setup with the protocol header naming ``payload``."""
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<II", head, 0x248, 0x100, len(payload))
    return bytes(head) + b"\x90" * 0x100 + payload + struct.pack("<I", len(ELF)) + b"\0" * 64


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress, bz2.compress], ids=["gzip", "xz", "bzip2"])
def test_stdlib_payloads(compress) -> None:  # type: ignore[no-untyped-def]
    assert extract_vmlinux(fake_bzimage(compress(ELF))) == ELF


@pytest.mark.parametrize("tool", ["lz4", "zstd"])
def test_tool_payloads(tool: str) -> None:
    assert shutil.which(tool), f"{tool} not installed (scripts/setup installs it)"
    argv = [tool, "-l", "-c"] if tool == "lz4" else [tool, "-c"]
    payload = subprocess.run(argv, input=ELF, capture_output=True, check=True).stdout
    assert extract_vmlinux(fake_bzimage(payload)) == ELF


def test_elf_passthrough_and_scan_fallback() -> None:
    assert extract_vmlinux(ELF) == ELF
    assert extract_vmlinux(b"junk" * 100 + gzip.compress(ELF)) == ELF


def test_not_a_kernel() -> None:
    with pytest.raises(ProfileError, match="not a Linux kernel"):
        extract_vmlinux(b"hello world" * 100)
