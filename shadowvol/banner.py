"""Find the Linux banner ("Linux version ...") in guest physical memory."""

from __future__ import annotations

import mmap
import re

from .errors import BackendError

BANNER_RE = re.compile(rb"Linux version \d+\.\d+[^\n\x00]{10,400}\n\x00")


def find_banners(ram_file: str) -> list[tuple[int, str]]:
    """(physical address, text) of each NUL-terminated banner in a RAM file.

    The kernel's ``linux_banner`` is "Linux version %s (%s) %s\\n" in .rodata,
    followed by its NUL; copies in the printk buffer lack that terminator.
    """
    try:
        with open(ram_file, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            return [(m_.start(), m_.group(0)[:-2].decode(errors="replace"))
                    for m_ in BANNER_RE.finditer(m)]
    except OSError as exc:
        raise BackendError(f"cannot map guest RAM {ram_file}: {exc.strerror}") from None
