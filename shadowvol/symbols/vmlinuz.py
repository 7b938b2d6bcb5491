"""vmlinuz (x86 bzImage) -> vmlinux ELF (Documentation/x86/boot.rst,
scripts/extract-vmlinux).

The compressed payload is located from the boot protocol header
(``payload_offset``/``payload_length``, protocol 2.08+); when that fails,
by scanning for the magic of each supported compressor, as
scripts/extract-vmlinux does.
"""

from __future__ import annotations

import bz2
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

from shadowvol.errors import ProfileError

__all__ = ["extract_vmlinux", "bzimage_payload", "decompress_payload", "COMPRESSORS", "MAX_VMLINUX",
           "elf_errors", "open_elf", "kernel_payload_file"]

#: Largest decompressed kernel accepted (a 6.1 cloud vmlinux is 53 MB; a
#: decompression bomb must not exhaust memory).
MAX_VMLINUX = 1 << 30

#: Payload magics, as in scripts/extract-vmlinux.
COMPRESSORS: dict[str, bytes] = {
    "gzip": b"\x1f\x8b\x08",
    "xz": b"\xfd7zXZ\x00",
    "bzip2": b"BZh",
    "lzma": b"\x5d\x00\x00",
    "lzo": b"\x89LZO",
    "lz4": b"\x02\x21\x4c\x18",
    "zstd": b"\x28\xb5\x2f\xfd",
}

_ELF_MAGIC = b"\x7fELF"


def bzimage_payload(image: bytes) -> bytes | None:
    """The compressed payload named by the bzImage header, or None when the
    image is not a bzImage with boot protocol >= 2.08."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length == 0 or start + payload_length > len(image):
        return None
    return image[start:start + payload_length]


def _lz4_legacy(payload: bytes) -> bytes:
    """Decompresses an LZ4 legacy frame (magic 0x184C2102), as the kernel's
    boot LZ4 payload is: python-lz4 when installed, else the ``lz4`` tool."""
    try:
        import lz4.block  # type: ignore[import-not-found]
    except ImportError:
        lz4_block = None
    else:
        lz4_block = lz4.block
    if lz4_block is not None:
        out = []
        off = 4
        total = 0
        while off + 4 <= len(payload):
            size = struct.unpack_from("<I", payload, off)[0]
            if size == 0x184C2102:  # concatenated frame
                off += 4
                continue
            if size == 0 or off + 4 + size > len(payload):
                break  # trailing size word or padding
            out.append(lz4_block.decompress(payload[off + 4:off + 4 + size], uncompressed_size=8 << 20))
            total += len(out[-1])
            if total > MAX_VMLINUX:
                raise ProfileError(f"lz4 payload decompresses to more than {MAX_VMLINUX >> 20} MiB")
            off += 4 + size
        return b"".join(out)
    return _run_tool(["lz4", "-dc"], payload, "lz4")


def _run_tool(argv: list[str], data: bytes, name: str) -> bytes:
    """Pipes ``data`` through a decompressor; keeps its output even when it
    complains about trailing bytes after the stream."""
    import tempfile

    if shutil.which(argv[0]) is None:
        raise ProfileError(f"{name} payload: install the python module or the '{argv[0]}' tool")
    # Input from a file, output read up to MAX_VMLINUX + 1 bytes: a bomb is
    # cut off, not buffered (no feeder thread needed).
    with tempfile.TemporaryFile() as src:
        src.write(data)
        src.seek(0)
        proc = subprocess.Popen(argv, stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout.read(MAX_VMLINUX + 1)
        if len(out) > MAX_VMLINUX:
            proc.kill()
        proc.stdout.close()
        err = proc.stderr.read(4096)
        proc.stderr.close()
        proc.wait()
    if len(out) > MAX_VMLINUX:
        raise ProfileError(f"{name} payload decompresses to more than {MAX_VMLINUX >> 20} MiB")
    if not out:
        raise ProfileError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")
    return out


def decompress_payload(payload: bytes, method: str) -> bytes:
    """Decompresses a kernel payload; trailing bytes (the kernel appends the
    uncompressed size) are ignored."""
    limit = MAX_VMLINUX + 1  # one byte more than allowed tells a bomb apart
    if method == "gzip":
        out = zlib.decompressobj(wbits=31).decompress(payload, limit)
    elif method == "xz":
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload, limit)
    elif method == "lzma":
        out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload, limit)
    elif method == "bzip2":
        out = bz2.BZ2Decompressor().decompress(payload, limit)
    elif method == "lz4":
        out = _lz4_legacy(payload)
    elif method == "zstd":
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            return _run_tool(["zstd", "-dc"], payload, "zstd")
        import io
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as reader:
            out = reader.read(limit)
    elif method == "lzo":
        return _run_tool(["lzop", "-dc"], payload, "lzo")
    else:
        raise ProfileError(f"unknown compression {method!r}")
    if len(out) > MAX_VMLINUX:
        raise ProfileError(f"{method} payload decompresses to more than {MAX_VMLINUX >> 20} MiB")
    return out


def _try(payload: bytes, method: str) -> bytes | None:
    try:
        out = decompress_payload(payload, method)
    except ProfileError as exc:
        if "decompresses to more than" in str(exc):
            raise
        return None
    except Exception:  # noqa: BLE001 - each decompressor has its own errors (zlib, lzma, lz4, zstd)
        return None
    return out if out.startswith(_ELF_MAGIC) else None


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The vmlinux ELF image inside a vmlinuz (or ``vmlinuz`` itself if it is
    already an ELF).

    :raises ProfileError: when no supported payload decompresses to an ELF.
    """
    if vmlinuz.startswith(_ELF_MAGIC):
        return vmlinuz
    payload = bzimage_payload(vmlinuz)
    if payload is not None:
        for method, magic in COMPRESSORS.items():
            if payload.startswith(magic):
                out = _try(payload, method)
                if out is not None:
                    return out
    # Fallback: scan for each magic like scripts/extract-vmlinux.
    for method, magic in COMPRESSORS.items():
        pos = vmlinuz.find(magic)
        tries = 0
        while pos >= 0 and tries < 8:
            out = _try(vmlinuz[pos:], method)
            if out is not None:
                return out
            pos = vmlinuz.find(magic, pos + 1)
            tries += 1
    raise ProfileError("not a Linux kernel image: no compressed ELF payload found "
                       f"(tried {', '.join(COMPRESSORS)})")


def elf_errors(broad: bool = True) -> tuple[type[BaseException], ...]:
    """What pyelftools raises on a corrupt ELF (it parses lazily, so any
    access may raise these, not only opening). ``broad=False``: only its own
    exception classes, for wrapping code that does more than parse."""
    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.construct.core import ConstructError

    own: tuple[type[BaseException], ...] = (ELFError, DWARFError, ConstructError, struct.error)
    if not broad:
        return own
    return own + (ValueError, IndexError, KeyError, TypeError, AttributeError, AssertionError,
                  OverflowError, EOFError, zlib.error, lzma.LZMAError, RecursionError)


def open_elf(data: bytes, what: str = "kernel image") -> "Any":
    """An ``ELFFile`` over ``data``, with its header and section/segment
    tables read once up front; corruption raises ProfileError."""
    import io

    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        for _ in elf.iter_sections():
            pass
        for _ in elf.iter_segments():
            pass
    except elf_errors() as exc:
        raise ProfileError(f"{what}: corrupt or truncated ELF ({type(exc).__name__}: {exc})") from None
    return elf


def kernel_payload_file(vmlinuz: "str | os.PathLike[str]") -> Path:
    """A file holding the decompressed payload of a vmlinuz (the vmlinux ELF
    followed by ``vmlinux.relocs``), for checks that compare kernel text.

    An ELF is returned as it is. The payload is kept in the cache, keyed by
    the vmlinuz's path, size and mtime, and written whole or not at all.

    :raises ProfileError: the file is unreadable or not a kernel image.
    """
    import hashlib

    from shadowvol import paths
    from shadowvol.safeio import atomic_write, check_input, read_input

    src = check_input(vmlinuz, "kernel image")
    with open(src, "rb") as f:
        if f.read(4) == _ELF_MAGIC:
            return src
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    out = paths.private_dir(paths.cache_dir() / "kernel-payload") / f"{key}.elf"
    if out.is_file():
        return out
    payload = extract_vmlinux(read_input(src, "kernel image", limit=256 << 20))
    atomic_write(out, payload, mode=0o600)
    return out
