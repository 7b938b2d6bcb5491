"""Find the running kernel: its page-table root (DTB), KASLR shifts, paging mode.

Cheapest source first, and never a scan of all memory when a cheap one exists:

1. VMCOREINFO (QEMU's vmcoreinfo device, or an ELF dump's note):
   ``KERNELOFFSET``, ``NUMBER(phys_base)``, ``SYMBOL(init_top_pgt)``,
   ``NUMBER(pgtable_l5_enabled)``.
2. Registers (QMP ``info registers`` or the gdbstub): CR3 gives a page-table
   root that maps the kernel, CR4.LA57 the paging mode; the first present page
   of the kernel-text region (``__START_KERNEL_map``..+1 GiB) is ``_text``,
   because ``cleanup_highmap()`` unmaps everything outside the image.
3. Signature search: the profile's banner in physical memory pins the image's
   physical placement; ``init_top_pgt`` lies at the same distance from
   ``linux_banner`` physically as at link time.

Every candidate is accepted only if ``linux_banner`` read *through the page
tables* equals the profile's banner, so a lying source is caught.

Arithmetic (arch/x86/include/asm/page_64.h)::

    runtime_va = link_va + virt_shift                    # virt_shift = KERNELOFFSET
    __pa_symbol(runtime_va) = runtime_va - __START_KERNEL_map + phys_base
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .backends.base import PhysicalMemory
from .errors import InvalidAddressError, ProfileError
from .paging import CR3_ADDRESS_MASK, CR4_LA57, FIVE_LEVEL, FOUR_LEVEL, PagedMemory, PagingFormat, \
    TranslationCache

__all__ = ["KernelLocation", "locate_from_vmcoreinfo", "locate_from_registers",
           "locate_by_scan", "verify_location", "START_KERNEL_MAP"]

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
KERNEL_TEXT_END = START_KERNEL_MAP + (1 << 30)
PTI_USER_PGD_BIT = 1 << 12


@dataclass(frozen=True)
class KernelLocation:
    """Where the kernel is: ``dtb`` is the physical address of ``init_top_pgt``."""

    dtb: int
    virt_shift: int
    phys_base: int
    la57: bool
    source: str

    @property
    def paging_format(self) -> PagingFormat:
        return FIVE_LEVEL if self.la57 else FOUR_LEVEL

    def to_json(self) -> dict:
        return {"dtb": self.dtb, "virt_shift": self.virt_shift, "phys_base": self.phys_base,
                "la57": self.la57, "source": self.source}

    @classmethod
    def from_json(cls, d: Mapping) -> "KernelLocation":
        return cls(int(d["dtb"]), int(d["virt_shift"]), int(d["phys_base"]), bool(d["la57"]), str(d["source"]))


def _banner_matches(kernel: PagedMemory, banner_va: int, banner: bytes) -> bool:
    try:
        return kernel.read(banner_va, len(banner)) == banner
    except InvalidAddressError:
        return False


def verify_location(physical: PhysicalMemory, loc: KernelLocation, symbols: Mapping[str, int],
                    banner: bytes) -> bool:
    """True when ``linux_banner`` read through ``loc``'s page tables is ``banner``."""
    kernel = PagedMemory(physical, loc.dtb, loc.paging_format)
    return _banner_matches(kernel, symbols["linux_banner"] + loc.virt_shift, banner)


def _require(symbols: Mapping[str, int], *names: str) -> None:
    missing = [n for n in names if n not in symbols]
    if missing:
        raise ProfileError(f"the profile lacks symbol(s) {', '.join(missing)}")


def locate_from_vmcoreinfo(info: Mapping[str, str], physical: PhysicalMemory,
                           symbols: Mapping[str, int], banner: bytes) -> KernelLocation | None:
    """Location from VMCOREINFO values, or None if absent or not confirmed."""
    _require(symbols, "linux_banner")
    try:
        virt_shift = int(info["KERNELOFFSET"], 16)
        phys_base = int(info["NUMBER(phys_base)"], 0)
        pgt_va = int(info.get("SYMBOL(init_top_pgt)") or info["SYMBOL(swapper_pg_dir)"], 16)
    except (KeyError, ValueError):
        return None
    la57 = info.get("NUMBER(pgtable_l5_enabled)", "0").strip() == "1"
    loc = KernelLocation(pgt_va - START_KERNEL_MAP + phys_base, virt_shift, phys_base, la57, "vmcoreinfo")
    return loc if verify_location(physical, loc, symbols, banner) else None


def _text_start(kernel: PagedMemory) -> int | None:
    """First present virtual address in the kernel-text mapping (that is, ``_text``)."""
    for vaddr, _size, _paddr in kernel.iter_mapped(START_KERNEL_MAP, KERNEL_TEXT_END):
        return vaddr
    return None


def _locate_through(kernel: PagedMemory, symbols: Mapping[str, int], banner: bytes,
                    source: str) -> KernelLocation | None:
    text = _text_start(kernel)
    if text is None:
        return None
    virt_shift = text - symbols["_text"]
    if virt_shift % 0x1000 or not _banner_matches(kernel, symbols["linux_banner"] + virt_shift, banner):
        return None
    pgt_link = symbols.get("init_top_pgt", symbols.get("swapper_pg_dir"))
    if pgt_link is None:
        raise ProfileError("the profile lacks init_top_pgt and swapper_pg_dir")
    dtb, _ = kernel.translate(pgt_link + virt_shift)
    phys_base = dtb - (pgt_link + virt_shift - START_KERNEL_MAP)
    return KernelLocation(dtb, virt_shift, phys_base, kernel.format is FIVE_LEVEL, source)


def locate_from_registers(cr3: int, cr4: int, physical: PhysicalMemory, symbols: Mapping[str, int],
                          banner: bytes) -> KernelLocation | None:
    """Location from a vCPU's CR3 and CR4, or None if they do not lead to the kernel.

    With page-table isolation a vCPU in user mode runs on the user PGD, the
    odd half of an 8 KiB pair whose even half maps the kernel; both are tried.
    """
    _require(symbols, "_text", "linux_banner")
    fmt = FIVE_LEVEL if cr4 & CR4_LA57 else FOUR_LEVEL
    base = cr3 & CR3_ADDRESS_MASK
    for root in dict.fromkeys((base, base & ~PTI_USER_PGD_BIT)):
        kernel = PagedMemory(physical, root, fmt, TranslationCache(physical))
        try:
            loc = _locate_through(kernel, symbols, banner, "registers")
        except InvalidAddressError:
            loc = None
        if loc is not None:
            return loc
    return None


def locate_by_scan(physical: PhysicalMemory, symbols: Mapping[str, int],
                   banner: bytes) -> KernelLocation | None:
    """Location from the banner's physical address (a scan of RAM, the slow path)."""
    _require(symbols, "_text", "linux_banner")
    pgt_link = symbols.get("init_top_pgt", symbols.get("swapper_pg_dir"))
    if pgt_link is None:
        raise ProfileError("the profile lacks init_top_pgt and swapper_pg_dir")
    for pa_banner in physical.find(banner):
        dtb = pa_banner + (pgt_link - symbols["linux_banner"])
        if dtb % 0x1000:
            continue
        for fmt in (FOUR_LEVEL, FIVE_LEVEL):
            kernel = PagedMemory(physical, dtb, fmt, TranslationCache(physical))
            try:
                loc = _locate_through(kernel, symbols, banner, "scan")
            except InvalidAddressError:
                loc = None
            if loc is not None and loc.dtb == dtb:
                return loc
    return None
