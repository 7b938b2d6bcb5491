"""BTF blobs assembled type by type, for tests and the fuzz harness
(the format of include/uapi/linux/btf.h; type ids start at 1)."""

from __future__ import annotations

import struct

BTF_MAGIC = 0xEB9F


class BTFBuilder:
    """Assembles a BTF blob type by type; ids start at 1."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def s(self, name: str) -> int:
        """Offset of ``name`` in the string section (0 for the empty name)."""
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, name: str, kind: int, vlen: int, size_type: int, extra: bytes = b"", kflag: bool = False) -> int:
        """A ``struct btf_type`` of ``kind`` followed by ``extra``; returns its id."""
        info = (int(kflag) << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int, signed: bool = False, char: bool = False, boolean: bool = False) -> int:
        enc = (1 if signed else 0) | (2 if char else 0) | (4 if boolean else 0)
        return self.add(name, 1, 0, size, struct.pack("<I", (enc << 24) | size * 8))

    def struct_(self, name: str, size: int, members: list[tuple[str, int, int, int]], union: bool = False) -> int:
        kflag = any(bits for _, _, _, bits in members)
        extra = b"".join(struct.pack("<III", self.s(n), t, (bits << 24 | off) if kflag else off)
                         for n, t, off, bits in members)
        return self.add(name, 5 if union else 4, len(members), size, extra, kflag)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings
