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
import shutil
import struct
import subprocess
import zlib

from shadowvol.errors import ProfileError

__all__ = ["extract_vmlinux", "bzimage_payload", "decompress_payload", "COMPRESSORS"]

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
        while off + 4 <= len(payload):
            size = struct.unpack_from("<I", payload, off)[0]
            if size == 0x184C2102:  # concatenated frame
                off += 4
                continue
            if size == 0 or off + 4 + size > len(payload):
                break  # trailing size word or padding
            out.append(lz4_block.decompress(payload[off + 4:off + 4 + size], uncompressed_size=8 << 20))
            off += 4 + size
        return b"".join(out)
    return _run_tool(["lz4", "-dc"], payload, "lz4")


def _run_tool(argv: list[str], data: bytes, name: str) -> bytes:
    """Pipes ``data`` through a decompressor; keeps its output even when it
    complains about trailing bytes after the stream."""
    if shutil.which(argv[0]) is None:
        raise ProfileError(f"{name} payload: install the python module or the '{argv[0]}' tool")
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    if not proc.stdout:
        raise ProfileError(f"{argv[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def decompress_payload(payload: bytes, method: str) -> bytes:
    """Decompresses a kernel payload; trailing bytes (the kernel appends the
    uncompressed size) are ignored."""
    if method == "gzip":
        return zlib.decompressobj(wbits=31).decompress(payload)
    if method == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if method == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if method == "bzip2":
        return bz2.BZ2Decompressor().decompress(payload)
    if method == "lz4":
        return _lz4_legacy(payload)
    if method == "zstd":
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            return _run_tool(["zstd", "-dc"], payload, "zstd")
        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if method == "lzo":
        return _run_tool(["lzop", "-dc"], payload, "lzo")
    raise ProfileError(f"unknown compression {method!r}")


def _try(payload: bytes, method: str) -> bytes | None:
    try:
        out = decompress_payload(payload, method)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, ProfileError):
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
