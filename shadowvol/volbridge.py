"""Run stock volatility3 plugins on live memory.

Three pieces plug our stack into volatility3's:

- :class:`LivePhysicalLayer`: a data layer over a :class:`PhysicalMemory`
  backend. No cache: every read goes to the backend (the guest is live).
- :class:`LiveLinuxIntel32e` (and the 5-level variant): a ``LinuxIntel32e``
  whose translation and reads go through :class:`shadowvol.paging.PagedMemory`.
  volatility3 wraps ``read``, ``_translate_entry`` and ``_get_valid_table`` in
  ``functools.lru_cache``, which serves stale data on a running guest; these
  are replaced here, and the only cache is our explicit per-epoch one.
- :class:`PreloadedLinuxSymbols`: ``LinuxKernelIntermedSymbols`` built from an
  ISF dict already in memory (our fast profile store), instead of a JSON file
  parsed and schema-validated on every run.

:func:`build_context` assembles a context with a ``kernel`` module, as
volatility3's Linux automagic would, from what shadowvol already knows
(DTB, KASLR shift); :func:`run_plugin` runs one plugin and renders it.
"""

from __future__ import annotations

import importlib
import logging
import types
from typing import Any, Iterable, Iterator, Mapping

from volatility3.framework import constants, contexts, exceptions, interfaces, objects, symbols
from volatility3.framework.layers import intel, scanners
from volatility3.framework.symbols import intermed
from volatility3.framework.symbols.linux import LinuxKernelIntermedSymbols
# Imported by volatility3's full plugin scan, which we skip for start-up time;
# LinuxKernelIntermedSymbols needs it.
from volatility3.framework.symbols.linux.extensions import network as _network  # noqa: F401
from volatility3.framework.constants import architectures as _architectures  # noqa: F401

from .backends.base import PhysicalMemory
from .errors import InvalidAddressError, ShadowvolError
from .kaslr import KernelLocation
from .paging import FIVE_LEVEL, FOUR_LEVEL, PagedMemory, TranslationCache
from .voladapt import adapt_volatility3

PHYSICAL_LAYER = "memory_layer"
KERNEL_LAYER = "kernel_layer"
KERNEL_MODULE = "kernel"
SYMBOL_TABLE = "symbol_table_name1"


class LivePhysicalLayer(interfaces.layers.DataLayerInterface):
    """Guest-physical memory from a shadowvol backend; read-only, uncached."""

    def __init__(self, context: interfaces.context.ContextInterface, config_path: str, name: str,
                 memory: PhysicalMemory, metadata: dict | None = None,
                 cache: TranslationCache | None = None) -> None:
        super().__init__(context, config_path, name, metadata)
        self._memory = memory
        self.translation_cache = cache if cache is not None else TranslationCache(memory)
        ranges = memory.ranges()
        self._max = (ranges[-1][1] - 1) if ranges else 0

    @property
    def memory(self) -> PhysicalMemory:
        return self._memory

    @property
    def maximum_address(self) -> int:
        return self._max

    @property
    def minimum_address(self) -> int:
        return 0

    def is_valid(self, offset: int, length: int = 1) -> bool:
        return self._memory.is_valid(offset, length)

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        try:
            if pad:
                return self._memory.read_partial(offset, length).data
            return self._memory.read(offset, length)
        except InvalidAddressError as exc:
            raise exceptions.InvalidAddressException(self.name, exc.address, str(exc)) from None

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "shadowvol never writes guest memory")

    def _ram_sections(self, sections: Any) -> list[tuple[int, int]]:
        ranges = self._memory.ranges()
        ram_sections = []
        for start, length in sections:
            for lo, hi in ranges:
                a, b = max(start, lo), min(start + length, hi)
                if a < b:
                    ram_sections.append((a, b - a))
        return ram_sections

    def _scan_iterator(self, scanner: Any, sections: Any) -> Iterator[Any]:
        """Chunks of the sections that lie in guest RAM (holes skipped, as a
        segmented layer such as LiME's does), so no chunk straddles a hole."""
        return super()._scan_iterator(scanner, self._ram_sections(sections))

    def scan(self, context: interfaces.context.ContextInterface, scanner: Any,
             progress_callback: Any = None, sections: Any = None) -> Iterator[Any]:
        """volatility3's scan; stock literal scanners are answered by ``bytes.find``.

        ``MultiStringScanner`` runs a Python ``re`` alternation (~40 MB/s);
        :func:`find_literals` gives the same hits (leftmost, longest, not
        overlapping) at memory speed. Any other scanner takes the stock path.
        """
        needles = literal_needles(scanner)
        if needles is None:
            yield from super().scan(context, scanner, progress_callback, sections)
            return
        scanner.context = context
        scanner.layer_name = self.name
        if sections is None:
            sections = [(self.minimum_address, self.maximum_address - self.minimum_address + 1)]
        ram = self._ram_sections(self._coalesce_sections(sections))
        total = sum(n for _, n in ram) or 1
        done = 0
        for start, length in ram:
            bytes_scanner = type(scanner) is scanners.BytesScanner
            for offset, needle in find_literals(self._memory, start, start + length, needles,
                                                overlapping=bytes_scanner):
                if bytes_scanner:
                    yield offset
                else:
                    yield offset, needle
            done += length
            if progress_callback:
                progress_callback(done * 100 / total, f"Scanning {self.name} using {type(scanner).__name__}")

    @classmethod
    def get_requirements(cls) -> list:
        return []


def literal_needles(scanner: Any) -> list[bytes] | None:
    """The byte strings a stock ``BytesScanner`` / ``MultiStringScanner`` looks for, else None.

    Only these exact classes (not subclasses, which may filter hits) are recognised.
    """
    if type(scanner) is scanners.BytesScanner and scanner.needle:
        return [bytes(scanner.needle)]
    if type(scanner) is scanners.MultiStringScanner:
        trie = getattr(scanner, "_pattern_trie", None)
        if not isinstance(trie, dict):
            return None
        out: list[bytes] = []
        stack: list[tuple[dict, bytes]] = [(trie, b"")]
        while stack:
            node, prefix = stack.pop()
            for key, child in node.items():
                if key == -1:
                    out.append(prefix)
                elif isinstance(child, dict):
                    stack.append((child, prefix + bytes([key])))
        return [n for n in out if n] or None
    return None


def _anchor(needles: list[bytes]) -> tuple[int, bytes]:
    """The longest run of bytes all needles share at the same offset: ``(offset, bytes)``."""
    shortest = min(len(n) for n in needles)
    best = (0, b"")
    run_start = None
    for pos in range(shortest + 1):
        same = pos < shortest and all(n[pos] == needles[0][pos] for n in needles)
        if same and run_start is None:
            run_start = pos
        elif not same and run_start is not None:
            if pos - run_start > len(best[1]):
                best = (run_start, needles[0][run_start:pos])
            run_start = None
    return best


def find_literals(memory: PhysicalMemory, start: int, end: int, needles: list[bytes],
                  overlapping: bool = False) -> Iterator[tuple[int, bytes]]:
    """``(address, needle)`` for each occurrence of any needle in ``[start, end)``, in order.

    The semantics of ``re.finditer`` over an alternation of the needles (as
    volatility3's MultiStringScanner compiles them): at each position the
    longest needle that matches wins, and matches never overlap, even with
    one needle (``b"\\0\\0"`` in four zero bytes: at 0 and 2). With
    ``overlapping`` (one needle only), every occurrence is reported, as
    BytesScanner does (``data.find(needle, pos + 1)``: at 0, 1 and 2).

    Several needles are searched through the longest anchor they share at
    one offset (kernel pointers share their high bytes), then verified;
    without an anchor of 3 bytes, each needle is searched on its own.
    """
    if len(needles) == 1:
        needle, last_end = needles[0], start
        for addr in memory.find(needle, start, end):
            if overlapping or addr >= last_end:
                last_end = addr + len(needle)
                yield addr, needle
        return
    wanted = set(needles)
    lengths = sorted({len(n) for n in needles}, reverse=True)
    at, anchor = _anchor(needles)
    hits: Iterator[tuple[int, bytes]]
    if len(anchor) >= 3:
        def anchored() -> Iterator[tuple[int, bytes]]:
            for a in memory.find(anchor, start + at, end + at):
                base = a - at
                for n in lengths:
                    if base + n <= end + lengths[0]:
                        cand = memory.read_partial(base, n).data
                        if cand in wanted:
                            yield base, cand
                            break
        hits = anchored()
    else:
        found = sorted((a, -len(n), n) for n in needles for a in memory.find(n, start, end))
        hits = ((a, n) for a, _, n in found)
    last_end = start
    for addr, needle in hits:
        if start <= addr < end and addr >= last_end:
            last_end = addr + len(needle)
            yield addr, needle


class LiveLinuxIntel32e(intel.LinuxIntel32e):
    """4-level Linux paging through :class:`PagedMemory` (explicit epoch cache)."""

    _paging_format = FOUR_LEVEL

    def __init__(self, context: interfaces.context.ContextInterface, config_path: str, name: str,
                 metadata: dict | None = None, paged: PagedMemory | None = None) -> None:
        super().__init__(context, config_path, name, metadata)
        if paged is None:
            # volatility3 builds process layers itself (parent_layer.__class__(ctx, cfg, name)):
            # same physical layer and epoch cache, another page-table root.
            phys = context.layers[self._base_layer]
            if not isinstance(phys, LivePhysicalLayer):
                raise exceptions.LayerException(name, f"{self._base_layer} is not a shadowvol physical layer")
            paged = PagedMemory(phys.memory, self._page_map_offset, self._paging_format,
                                phys.translation_cache, name=name)
        self._paged = paged
        self._vmask = (1 << self._maxvirtaddr) - 1
        self._half = 1 << (self._maxvirtaddr - 1)
        self._canon_keep = (1 << (self._maxvirtaddr + 1)) - 1
        self._canon_stock = self._bits_per_register <= self._maxvirtaddr
        self._ram_is_valid: Any = None  # the physical layer's is_valid, once looked up
        self._tlb_get, self._phys_read = paged._tlb_get, paged._phys_read  # read()'s TLB hit

    def canonicalize(self, addr: int) -> int:
        """Intel's ``canonicalize`` with its masks computed once (called for every read)."""
        if self._canon_stock:
            return super().canonicalize(addr)
        if addr < self._half:
            return addr
        return (addr & self._canon_keep) + self._canonical_prefix

    def _fault(self, offset: int, exc: InvalidAddressError) -> exceptions.InvalidAddressException:
        if exc.level is not None:
            # invalid_bits: the span the failing entry maps (a missing PML4 entry
            # leaves 512 GiB unmapped), so mapping() skips it whole, as Intel does.
            bits = self._paged.format.page_size(exc.level).bit_length() - 1
            return exceptions.PagedInvalidAddressException(self.name, offset, bits, exc.entry or 0, str(exc))
        return exceptions.InvalidAddressException(self.name, offset, str(exc))

    def is_valid(self, offset: int, length: int = 1) -> bool:
        """Intel's ``is_valid`` (every page mapped, every frame readable below),
        page by page through the epoch's TLB instead of building ``mapping()`` runs:
        plugins call it for each pointer they follow."""
        vaddr = offset & self._vmask
        end = vaddr + length
        half = self._half
        if length <= 0 or (vaddr < half < end) or self._canon_stock:
            return super().is_valid(offset, length)
        ram_is_valid = self._ram_is_valid
        if ram_is_valid is None:  # the memory's own, behind our physical layer
            phys = self._context.layers[self._base_layer]
            ram_is_valid = self._ram_is_valid = \
                phys.memory.is_valid if type(phys) is LivePhysicalLayer else phys.is_valid
        paged = self._paged
        tlb_get = paged._tlb_get
        # canonicalize(), written out: the range lies in one half of the masked space, and
        # an upper-half address there only gains the sign-extension prefix
        shift = 0 if vaddr < half else self._canonical_prefix
        pos = vaddr
        while pos < end:
            n = min(end, (pos | 0xFFF) + 1) - pos
            canonical = pos + shift
            ppage = tlb_get(canonical >> 12)
            if ppage is None:
                try:
                    ppage = paged._page(canonical)
                except InvalidAddressError:
                    return False
            if not ram_is_valid(ppage | (canonical & 0xFFF), n):
                return False
            pos += n
        return True

    def _mapping(self, offset: int, length: int,
                 ignore_errors: bool = False) -> Iterator[tuple[int, int, int, int, str]]:
        """Intel's page-by-page ``_mapping``, answered by our walker in runs.

        Same contract (offsets in the layer's masked address space; pages
        whose physical frame the memory layer cannot read are left out, as
        Intel does with ``is_valid``); ``mapping()`` merges the runs.
        """
        if length == 0:
            yield from super()._mapping(offset, length, ignore_errors)
            return
        phys = self._context.layers[self._base_layer]
        half = 1 << (self._maxvirtaddr - 1)
        pos, end = offset & self._vmask, (offset & self._vmask) + length
        # The masked space holds the lower canonical half, then the upper one.
        for lo, hi in ((pos, min(end, half)), (max(pos, half), end)):
            if lo >= hi:
                continue
            base = self.canonicalize(lo)
            try:
                runs = list(self._paged.mapping(base, hi - lo, ignore_errors))
            except InvalidAddressError as exc:
                raise self._fault(lo + (exc.address - base), exc) from None
            for vaddr, n, paddr in runs:
                v = vaddr & self._vmask
                if phys.is_valid(paddr, n):
                    yield v, n, paddr, n, self._base_layer
                    continue
                for k in range(0, n, 0x1000):  # RAM ends inside the run: page by page
                    if phys.is_valid(paddr + k, 0x1000):
                        yield v + k, 0x1000, paddr + k, 0x1000, self._base_layer
                    elif not ignore_errors:
                        raise exceptions.InvalidAddressException(self._base_layer, paddr + k)

    @property
    def paged(self) -> PagedMemory:
        """Our address space behind this layer (e.g. for ``iter_mapped`` over a region)."""
        return self._paged

    # volatility3 passes kernel addresses masked to the layer's width
    # (0xffff8... for 0xffffffff8...); canonicalize() restores the sign bits.

    def _translate(self, offset: int) -> tuple[int, int, str]:
        try:
            paddr, size = self._paged.translate(self.canonicalize(offset & self._vmask))
        except InvalidAddressError as exc:
            raise self._fault(offset, exc) from None
        return paddr, size, self._base_layer

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        vaddr = offset & self._vmask
        if self._canon_stock:
            vaddr = self.canonicalize(vaddr)
        elif vaddr >= self._half:  # canonicalize(), written out: every read comes here
            vaddr = (vaddr & self._canon_keep) + self._canonical_prefix
        if pad:
            return self._paged.read_padded(vaddr, length)
        try:
            off = vaddr & 0xFFF
            if off + length <= 0x1000 and length >= 0:  # PagedMemory.read's TLB hit, written out
                ppage = self._tlb_get(vaddr >> 12)
                if ppage is not None:
                    return self._phys_read(ppage | off, length)
            return self._paged.read(vaddr, length)
        except InvalidAddressError as exc:
            if exc.layer != self._paged.name:  # a frame outside RAM: the physical layer's fault, as Intel's
                raise exceptions.InvalidAddressException(self._base_layer, exc.address, str(exc)) from None
            raise self._fault((offset & self._vmask) + (exc.address - vaddr), exc) from None

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "shadowvol never writes guest memory")


class LiveLinuxIntel5Level(LiveLinuxIntel32e):
    """5-level (LA57) Linux paging; volatility3 itself has no such layer."""

    _maxvirtaddr = 57
    _paging_format = FIVE_LEVEL
    _structure = [("page map layer 5", 9, False)] + intel.Intel32e._structure


class PreloadedISF(intermed.IntermediateSymbolTable):
    """An IntermediateSymbolTable from an ISF dict (validated when it was built)."""

    def __init__(self, context: interfaces.context.ContextInterface, config_path: str, name: str,
                 isf_url: str, native_types: Any = None, table_mapping: dict | None = None,
                 validate: bool = False, class_types: Any = None, symbol_mask: int = 0,
                 isf: Mapping | None = None, versions: dict | None = None) -> None:
        if isf is None:
            raise ValueError("PreloadedISF needs the ISF dict")
        # versions: stock's map of ISF format versions to their classes, when a caller has it
        # (isf_create, once per context: walking the subclasses cost 25 us a table)
        self._versions = versions if versions is not None else isf_format_versions()
        fmt = isf.get("metadata", {}).get("format", "0.0.0")
        self._delegate = self._closest_version(fmt, self._versions)(
            context, config_path, name, isf, native_types, table_mapping)
        interfaces.symbols.SymbolTableInterface.__init__(
            self, context, config_path, name, native_types or self._delegate.natives,
            table_mapping=table_mapping, class_types=class_types)
        self.config["isf_url"] = isf_url
        self.config["symbol_mask"] = symbol_mask
        _untyped_symbols_fast(self._delegate)

    _types_view: Any = None

    @property
    def types(self) -> Iterable[str]:
        """The format delegate's ``types`` (a view of the user types, then the
        native ones), merged once: stock merges the two into a new dict on every
        call, and ``SymbolSpace.has_type`` asks for it on each check (pscallstack:
        for every frame of every task's stack, half its time at 2,000 tasks). The
        table's JSON is only read and its natives are fixed, so the view stays true."""
        view = self._types_view
        if view is None:
            view = self._types_view = self._delegate.types
        return view

    def symbols_by_address(self) -> list[tuple[int, str]]:
        """(address, name) of every symbol, sorted, built once per table from the ISF's own
        entries: what stock ``get_symbols_by_location`` would build from 82k ``get_symbol``
        calls (a second each side of a diff, for netfilter's module lookups), and the
        index check_syscall's kernel image searches."""
        if not self._sort_symbols:
            from .symbols import symbols_by_address

            self._sort_symbols = symbols_by_address(self._delegate._json_object["symbols"],
                                                    self.config.get("symbol_mask", 0))
        return self._sort_symbols

    def get_symbols_by_location(self, offset: int, size: int = 0) -> Iterable[str]:
        self.symbols_by_address()  # the stock lookup, on the index built above
        return super().get_symbols_by_location(offset, size)


def isf_format_versions() -> dict:
    """What stock ``IntermediateSymbolTable.__init__`` sets as ``_versions``: each
    ISF format version -> the ``ISFormatTable`` subclass reading it."""
    return dict((x.version, x) for x in intermed.class_subclasses(intermed.ISFormatTable))


def _untyped_symbols_fast(delegate: Any) -> None:
    """The format delegate's ``get_symbol`` answering plain symbols (an address, no type
    and no constant data: 80k of a kernel's 82k) without the per-call config lookups.

    The same ``SymbolInterface`` in the same cache as stock's Version5+
    ``get_symbol``; anything else (typed, constant data, unknown, older formats)
    goes to the stock method. Plugins that index every symbol (check_syscall's
    KernelImage, ``get_symbols_by_location``) paid ~9 us per symbol, mostly in
    ``self.config.get("symbol_mask")``. The mask is read once: the delegate's
    config branch is fixed when it is built (see :func:`build_context`).
    """
    stock = type(delegate).get_symbol
    if not isinstance(delegate, intermed.Version5Format) or stock is not intermed.Version5Format.get_symbol:
        return
    cache = delegate._symbol_cache
    entries = delegate._json_object["symbols"]
    mask = delegate.config.get("symbol_mask", 0)
    make = interfaces.symbols.SymbolInterface

    def get_symbol(name: str) -> Any:
        symbol = cache.get(name)
        if symbol:
            return symbol
        entry = entries.get(name)
        if not entry or "type" in entry or "constant_data" in entry:
            return stock(delegate, name)
        address = entry["address"] & mask if mask else entry["address"]
        symbol = cache[name] = make(name=name, address=address, type=None, constant_data=None)
        return symbol

    delegate.get_symbol = get_symbol


class PreloadedLinuxSymbols(LinuxKernelIntermedSymbols, PreloadedISF):
    """volatility3's Linux kernel symbols (with its object extensions), preloaded."""


class DeferredTemplate:
    """The pointee of a pointer template, resolved through the symbol space on first use.

    volatility3's ``SymbolSpace.get_type`` resolves every type reachable from
    the requested one: ``task_struct`` pulls in ~1,100 types and cost half a
    second per run, though a plugin dereferences a few dozen pointers. A
    deferred template stands in for a pointer's subtype and forwards every
    attribute (``size``, ``vol``, ``children``, ``has_member``, calls) to the
    real template once it is needed.
    """

    __slots__ = ("_space", "_type_name", "_real")

    def __init__(self, space: "LazySymbolSpace", type_name: str) -> None:
        self._space = space
        self._type_name = type_name
        self._real: Any = None

    def _resolve(self) -> Any:
        if self._real is None:
            self._real = self._space.get_type(self._type_name)
        return self._real

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._resolve(), attr)

    @property
    def size(self) -> int:
        """The real template's size (asked for every pointer that is checked or followed)."""
        return self._resolve().size

    def __call__(self, context: Any, object_info: Any) -> Any:
        return self._resolve()(context=context, object_info=object_info)


def isf_create(stock: Any) -> Any:
    """``IntermediateSymbolTable.create`` finding and parsing each ISF file once per context.

    Stock searches the symbol directories (``rglob``), opens the file through
    urllib, parses and validates the JSON on every call; library_list calls it
    for every memory map of every process (at 2,000 tasks: minutes, and 2 GB
    held by 10,000 copies of one small JSON). In a :class:`LiveContext` the
    first URL found and the validated JSON are kept per ``(sub_path,
    filename)`` (``isf_files``); each call still builds and appends a new
    table under a new name, from that JSON (read only by the table's format
    delegate), with stock's configuration and version checks, and appends it
    as a transient table (:meth:`LazySymbolSpace.append_transient`: only the
    newest keep their resolved types). Subclasses of
    ``IntermediateSymbolTable`` and other contexts take stock's path.
    """
    def create(cls: type, context: Any, config_path: str, sub_path: str, filename: str,
               native_types: Any = None, table_mapping: dict | None = None, class_types: Any = None,
               symbol_mask: int = 0) -> str:
        files = getattr(context, "isf_files", None)
        if cls is not intermed.IntermediateSymbolTable or not isinstance(files, dict):
            return stock(cls, context, config_path, sub_path, filename, native_types, table_mapping,
                         class_types, symbol_mask)
        found = files.get((sub_path, filename))
        if found is None:
            found = files[(sub_path, filename)] = _load_isf_file(cls, sub_path, filename)
        url, json_object = found
        versions = getattr(context, "isf_versions", None)
        if versions is None:  # read only (stock's _closest_version): one map serves every table
            versions = context.isf_versions = isf_format_versions()
        table_name = context.symbol_space.free_table_name(filename)
        table = PreloadedISF(context, config_path, table_name, url, native_types, table_mapping,
                             class_types=class_types, symbol_mask=symbol_mask, isf=json_object,
                             versions=versions)
        if table._delegate.version < constants.ISF_MINIMUM_SUPPORTED:
            raise RuntimeError(f"ISF version {json_object['metadata'].get('format', '0.0.0')} "
                               f"is no longer supported: {url}")
        if table._delegate.version < constants.ISF_MINIMUM_DEPRECATED:
            logging.getLogger(intermed.__name__).warning(
                f"ISF version {json_object['metadata'].get('format', '0.0.0')} has been deprecated: {url}")
        space = context.symbol_space
        if isinstance(space, LazySymbolSpace):
            space.append_transient(table)
        else:
            space.append(table)
        return table_name

    create.__wrapped__ = stock  # type: ignore[attr-defined]
    return create


def _load_isf_file(cls: type, sub_path: str, filename: str) -> tuple[str, Any]:
    """(URL, JSON) of the ISF file stock's ``create`` would load, found, read and
    validated as stock does, with stock's errors."""
    import codecs
    import json

    from volatility3 import schemas
    from volatility3.framework.layers import resources

    urls = list(cls.file_symbol_url(sub_path, filename))
    if not urls:
        raise FileNotFoundError(f"No symbol files found at provided filename: {filename}")
    with resources.ResourceAccessor().open(urls[0]) as fp:
        json_object = json.load(codecs.getreader("utf-8")(fp))
    if not schemas.validate(json_object):
        raise exceptions.SymbolSpaceError(f"File does not pass version validation: {urls[0]}")
    if not json_object.get("metadata", None):
        raise exceptions.SymbolSpaceError(f"Invalid ISF file attempted to be parsed: {urls[0]}")
    return urls[0], json_object


def adapt_isf_create() -> None:
    """Install :func:`isf_create` (idempotent; when a live context is built, never at import)."""
    current = intermed.IntermediateSymbolTable.__dict__["create"].__func__
    if getattr(current, "__wrapped__", None) is None:
        intermed.IntermediateSymbolTable.create = classmethod(isf_create(current))  # type: ignore[method-assign]


_ObjectTemplate = objects.templates.ObjectTemplate


class _ResolvedTypes(dict):
    """``SymbolSpace._resolved`` (type name -> resolved template) noting which names
    belong to each table made for one use (see :meth:`LazySymbolSpace.append_transient`):
    ``holding`` maps such a table to its names here, the table resolved in
    longest ago first. Lookups are a dict's own."""

    __slots__ = ("_transient", "holding")

    def __init__(self, transient: set[str]) -> None:
        super().__init__()
        self._transient = transient
        self.holding: dict[str, list[str]] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        table = key.partition(constants.BANG)[0]
        if table in self._transient:
            keys = self.holding.pop(table, None) or []
            keys.append(key)
            self.holding[table] = keys  # now the newest


class LazySymbolSpace(symbols.SymbolSpace):
    """A SymbolSpace that resolves embedded types eagerly (as volatility3
    does: sizes of arrays and members need them) but pointer targets lazily.

    Of the tables made for one use (:meth:`append_transient`), only the
    :attr:`KEEP_RESOLVED` resolved in most recently keep their templates in
    the resolution cache; an older one's are dropped before the next type is
    resolved, and resolved again if it is asked for them (stock drops the whole
    cache whenever a table is removed)."""

    #: transient tables whose resolved types are kept (library_list makes one
    #: per memory map and uses it for that map only)
    KEEP_RESOLVED = 64

    def __init__(self) -> None:
        super().__init__()
        self._free_from: dict[str, int] = {}  # prefix -> every lower count is taken
        self._transient: set[str] = set()
        self._resolved = _ResolvedTypes(self._transient)
        self._resolving = 0

    def append_transient(self, table: interfaces.symbols.BaseSymbolTableInterface) -> None:
        """``append(table)`` for a table made for one use (``IntermediateSymbolTable.create``:
        library_list's ELF table for each memory map). At 2,000 processes,
        20,000 such tables' templates held 250 MB; their resolved types are
        dropped once :attr:`KEEP_RESOLVED` others were resolved in since. The
        table stays, under its name."""
        self.append(table)
        self._transient.add(table.name)

    def get_type(self, type_name: str) -> interfaces.objects.Template:
        template = self._resolved.get(type_name)
        if type(template) is _ObjectTemplate:  # resolved before (stock's answer, without its checks)
            return template
        if template is None and not self._resolving:
            self._drop_oldest_resolved(type_name.partition(constants.BANG)[0])
        self._resolving += 1
        try:
            return super().get_type(type_name)
        finally:
            self._resolving -= 1

    def _drop_oldest_resolved(self, table: str) -> None:
        """Before ``table`` resolves a type: drop the resolved types of the
        transient tables resolved in longest ago, so that with ``table``'s
        :attr:`KEEP_RESOLVED` are left (never during a resolution: it reads
        what it added)."""
        resolved = self._resolved
        holding = getattr(resolved, "holding", None)
        if not holding:
            return
        over = len(holding) - (self.KEEP_RESOLVED if table in holding else self.KEEP_RESOLVED - 1)
        if over <= 0:
            return
        for name in list(holding)[:over]:
            for key in holding.pop(name):
                dict.pop(resolved, key, None)

    def free_table_name(self, prefix: str = "layer") -> str:
        """Stock's name (``prefix`` and the lowest count not in use), counted on from
        the last one found: stock counts from 1 on every call, quadratic in the tables
        a plugin makes (library_list makes one per memory map of every process)."""
        count = self._free_from.get(prefix, 1)
        while prefix + str(count) in self:
            count += 1
        self._free_from[prefix] = count
        return prefix + str(count)

    def remove(self, key: str) -> None:
        self._free_from.clear()  # a lower count may be free again
        super().remove(key)  # stock empties the resolution cache: so does this, keeping its bookkeeping
        self._transient.discard(key)
        self._resolved = _ResolvedTypes(self._transient)

    def _iterative_resolve(self, traverse_list: list) -> None:
        replacements = []
        while traverse_list:
            pending = [self._resolved[traverse_list.pop(0)]]
            while pending:
                traverser = pending.pop(0)
                is_pointer = issubclass(traverser.vol.object_class, objects.Pointer)
                for child in traverser.children:
                    if isinstance(child, DeferredTemplate):
                        continue
                    if isinstance(child, objects.templates.ReferenceTemplate):
                        name = child.vol.type_name
                        if is_pointer and name not in self._resolved:
                            replacements.append((traverser, child, DeferredTemplate(self, name)))
                            continue
                        if name not in self._resolved:
                            traverse_list.append(name)
                            try:
                                self._resolved[name] = self._weak_resolve(symbols.SymbolType.TYPE, name)
                            except exceptions.SymbolError:
                                self._resolved[name] = self.UnresolvedTemplate(name)
                        replacements.append((traverser, child, None))
                    elif child.children:
                        pending.append(child)
        for parent, child, new in replacements:
            parent.replace_child(child, new if new is not None else self._resolved[child.vol.type_name])


class LiveLayers(dict, interfaces.layers.LayerContainer):
    """volatility3's ``LayerContainer`` whose lookups are a dict's.

    Every object built and every member read asks ``context.layers[name]``
    (its address mask, its read): two Python calls each (the ``layers``
    property, ``LayerContainer.__getitem__``), about 200 per task in pslist.
    This container is a dict holding its layers (``_layers`` is itself, so
    ``add_layer``, ``del_layer`` and the rest of the stock methods work on it
    unchanged), and :class:`LiveContext` holds it as a plain attribute.
    """

    def __init__(self) -> None:
        dict.__init__(self)
        self._layers = self


class LiveContext(contexts.Context):
    """A volatility3 context whose symbol space resolves pointer targets lazily.

    One context is one epoch (one snapshot of the guest): ``epoch_cache``
    holds values that cannot change within it (see :func:`adapt_volatility3`);
    a new epoch is a new context. Its layers are a :class:`LiveLayers`, read
    without a property call (``layers`` is an instance attribute here).
    """

    layers = None  # shadows Context.layers (a property): the instance's own attribute is read

    def __init__(self) -> None:
        super().__init__()
        self._symbol_space = LazySymbolSpace()
        self._memory = LiveLayers()
        self.layers = self._memory
        self.epoch_cache: dict[Any, Any] = {}
        self.isf_files: dict[tuple[str, str], tuple[str, Any]] = {}  # see isf_create
        self.isf_versions: dict | None = None  # see isf_create


def build_context(memory: PhysicalMemory, paged: PagedMemory, location: KernelLocation,
                  isf: Mapping, isf_url: str = "shadowvol:profile") -> contexts.Context:
    """A volatility3 context with the physical layer, kernel layer and ``kernel`` module."""
    adapt_volatility3()
    adapt_isf_create()
    ctx = LiveContext()
    phys = LivePhysicalLayer(ctx, "shadowvol.physical", PHYSICAL_LAYER, memory, cache=paged.cache)
    ctx.layers.add_layer(phys)
    cfg = "shadowvol.kernel_layer"
    ctx.config[f"{cfg}.memory_layer"] = PHYSICAL_LAYER
    ctx.config[f"{cfg}.page_map_offset"] = location.dtb
    ctx.config[f"{cfg}.kernel_virtual_offset"] = location.virt_shift
    cls = LiveLinuxIntel5Level if location.la57 else LiveLinuxIntel32e
    kernel_layer = cls(ctx, cfg, KERNEL_LAYER, metadata={"os": "Linux"}, paged=paged)
    ctx.layers.add_layer(kernel_layer)
    # As volatility3's symbol finder does: symbol addresses are masked to the
    # kernel layer's width, so address -> symbol lookups of (masked) pointers
    # match. It goes into the context config *before* the table is built: the
    # ISF format delegate caches its config branch when it is created.
    scfg = "shadowvol.symbols"
    ctx.config[f"{scfg}.symbol_mask"] = kernel_layer.address_mask
    ctx.config[f"{scfg}.isf_url"] = isf_url
    table = PreloadedLinuxSymbols(ctx, scfg, SYMBOL_TABLE, isf_url, isf=isf,
                                  symbol_mask=kernel_layer.address_mask)
    ctx.symbol_space.append(table)
    mcfg = "shadowvol.kernel"
    ctx.config[f"{mcfg}.layer_name"] = KERNEL_LAYER
    ctx.config[f"{mcfg}.symbol_table_name"] = SYMBOL_TABLE
    ctx.config[f"{mcfg}.offset"] = location.virt_shift
    ctx.add_module(contexts.Module(ctx, mcfg, KERNEL_MODULE))
    return ctx


class BootContext:
    """One volatility3 context for one boot of a guest, looked through epoch after epoch.

    What a boot fixes is built once (:func:`build_context`): the physical and
    kernel layers (the DTB and the KASLR shift are the boot's), the symbol
    table with every type it has resolved, and the ``kernel`` module. A new
    context per look re-resolved ``task_struct`` and its members each time
    (half of a 50-task ``linux.pslist``). :meth:`new_epoch` drops everything
    one look may have seen or left: the translation cache, the context's
    ``epoch_cache``, layers a plugin added (process layers), configuration
    written since the base (plugin options, those layers' settings), and
    observers set on the base layers' instances (``RunHealth.watch_layer``).
    """

    def __init__(self, memory: PhysicalMemory, paged: PagedMemory, location: KernelLocation,
                 isf: Mapping, isf_url: str = "shadowvol:profile") -> None:
        self.location = location
        self.context = build_context(memory, paged, location, isf, isf_url=isf_url)
        self._cache = paged.cache
        self._base_layers = tuple(self.context.layers)
        self._base_attrs = {n: set(vars(self.context.layers[n])) for n in self._base_layers}
        self._base_tables = tuple(self.context.symbol_space)
        self._base_config = self.context.config.clone()

    def new_epoch(self) -> None:
        """Forget everything read or built since the boot context was made."""
        self._cache.invalidate()
        self.context.epoch_cache.clear()
        self.clear_plugin_state()

    def clear_plugin_state(self) -> None:
        """Drop what a plugin left in the context (layers and symbol tables it added,
        configuration it wrote, observers set on the base layers), keeping the epoch's caches:
        the next plugin sees the same moment of the guest."""
        ctx = self.context
        for name in reversed([n for n in ctx.layers if n not in self._base_layers]):
            ctx.layers.del_layer(name)  # the newest first: a layer goes before those it depends on
        for name in self._base_layers:
            layer = ctx.layers[name]
            for attr in [a for a, v in vars(layer).items() if callable(v) and a not in self._base_attrs[name]]:
                delattr(layer, attr)  # a method overridden on the instance since (an observer of one epoch)
        space = ctx.symbol_space
        added = [n for n in space if n not in self._base_tables]
        for name in added:  # tables a plugin made (library_list: one per memory map); the
            space.remove(name)  # next resolution starts afresh, as after any stock remove
        ctx.config = self._base_config.clone()

    def construct(self, plugin_cls: type, options: Mapping[str, Any], file_handler: type | None = None) -> Any:
        """The plugin, configured for this context (call :meth:`new_epoch` first)."""
        return construct_plugin(self.context, plugin_cls, options, file_handler=file_handler)


def our_plugin_dir() -> "Path":
    """Directory of shadowvol's own volatility3 plugins: the ``shadowvol.plugins`` package
    (what stock ``vol -p`` takes), found through the import system, installed or not."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("shadowvol.plugins")
    if spec is None or not spec.submodule_search_locations:
        raise ShadowvolError("shadowvol's plugin package (shadowvol.plugins) is not installed")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def our_plugin_files() -> list:
    """Modules of ours that define a plugin (helpers such as ``kernel_hooks`` left out)."""
    d = our_plugin_dir() / "linux"
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.py")):
        if p.name.startswith("_"):
            continue
        try:
            load_plugin(f"linux.{p.stem}", ours_only=True)
        except ShadowvolError:
            continue  # a helper module (kernel_hooks): no plugin class of its own
        out.append(p)
    return out


def use_our_plugins() -> str:
    """Put our plugin directory first on ``volatility3.plugins.__path__`` (as
    ``vol -p DIR`` does) before any plugin is imported; returns the directory."""
    import os

    import volatility3.plugins

    ours = str(our_plugin_dir())
    if os.path.isdir(ours) and ours not in volatility3.plugins.__path__:
        volatility3.plugins.__path__.insert(0, ours)
    return ours


def load_plugin(name: str, ours_only: bool = False) -> type:
    """Import only the named plugin: ``linux.pslist`` or ``linux.pslist.PsList``.

    Our plugin directory (:func:`our_plugin_dir`) goes first on
    ``volatility3.plugins.__path__`` here, when a plugin is loaded (never at
    import), as ``vol -p DIR`` puts it, so our ``linux.check_syscall`` shadows
    the stock module of that name and the stock ones still load (our
    ``linux`` package extends its own ``__path__`` with the stock directory).
    """
    from volatility3.framework.interfaces.plugins import PluginInterface

    ours = use_our_plugins()
    parts = name.split(".")
    candidates = []
    if len(parts) >= 2:
        candidates.append((".".join(parts), None))
        candidates.append((".".join(parts[:-1]), parts[-1]))
    for mod_name, cls_name in candidates:
        prefix = "volatility3.plugins."
        try:
            mod = importlib.import_module(prefix + mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and (prefix + mod_name).startswith(exc.name):
                continue
            raise
        if ours_only and not str(getattr(mod, "__file__", "")).startswith(ours):
            continue
        classes = [c for c in vars(mod).values() if isinstance(c, type)
                   and issubclass(c, PluginInterface) and c.__module__ == mod.__name__]
        if cls_name:
            classes = [c for c in classes if c.__name__ == cls_name]
        if len(classes) == 1:
            return classes[0]
        if len(classes) > 1:
            raise ShadowvolError(f"plugin {name!r} is ambiguous: "
                                 f"{', '.join(c.__name__ for c in classes)}")
    raise ShadowvolError(f"unknown plugin {name!r} (e.g. linux.pslist, linux.lsmod, linux.kmsg)")


def construct_plugin(ctx: contexts.Context, plugin_cls: type, options: Mapping[str, Any],
                     file_handler: type | None = None) -> Any:
    """Configure ``plugin_cls`` to use our ``kernel`` module, then build it."""
    from volatility3.framework import plugins
    from volatility3.framework.configuration import requirements

    base = "plugins"
    path = f"{base}.{plugin_cls.__name__}"
    for req in plugin_cls.get_requirements():
        if isinstance(req, requirements.ModuleRequirement):
            ctx.config[f"{path}.{req.name}"] = KERNEL_MODULE
        elif isinstance(req, requirements.TranslationLayerRequirement):
            ctx.config[f"{path}.{req.name}"] = KERNEL_LAYER
        elif isinstance(req, requirements.SymbolTableRequirement):
            ctx.config[f"{path}.{req.name}"] = SYMBOL_TABLE
    for key, value in options.items():
        ctx.config[f"{path}.{key}"] = value
    try:
        return plugins.construct_plugin(ctx, [], plugin_cls, base, None, file_handler)
    except exceptions.UnsatisfiedException as exc:
        missing = ", ".join(k.split(".")[-1] for k in exc.unsatisfied)
        raise ShadowvolError(f"{plugin_cls.__name__} cannot run here: unsatisfied requirement(s) "
                             f"{missing}") from None


#: The Python types a volatility3 primitive object is also an instance of
#: (``Integer``, ``Pointer``, ``Enumeration``... are ints; ``String`` a str).
PLAIN_TYPES = (int, float, str, bytes)


#: What a renderer or a consumer may call to turn a cell into text or a number:
#: a class that defines any of them itself may render unlike its plain value.
_CONVERSIONS = ("__str__", "__repr__", "__format__", "__int__", "__index__", "__float__", "__bytes__")


def _converts_as(cls: type, base: type) -> bool:
    """``cls`` turns into text and numbers exactly as ``base`` does (no override)."""
    return all(getattr(cls, name, None) is getattr(base, name, None) for name in _CONVERSIONS)


def plain_cell(value: Any, column_type: Any, converts_as: dict) -> Any:
    """A row cell that is a volatility3 primitive object, as its plain value
    (``int(pid)`` for ``task.pid``); any other cell, one the column's type
    would no longer accept as plain, or one whose class converts itself
    otherwise than its plain type, as it is. ``converts_as``: the caller's
    cache of :func:`_converts_as` per class."""
    if not isinstance(value, interfaces.objects.ObjectInterface):
        return value
    for base in PLAIN_TYPES:
        if isinstance(value, base):
            cls = type(value)
            same = converts_as.get(cls)
            if same is None:
                same = converts_as[cls] = _converts_as(cls, base)
            if not same:
                return value
            plain = base(value)
            try:
                return plain if isinstance(plain, column_type) else value
            except TypeError:  # a column type isinstance() cannot check
                return value
    return value


def detach_rows(grid: Any) -> None:
    """Rows of ``grid`` that hold plain values, not the plugin's objects (issue 12: memory at scale).

    A stock plugin often yields an object as a cell (pslist: ``task.pid``, an
    ``Integer``), and the TreeGrid keeps every row it populates. Such an
    object holds its parent (``vol.parent``), which holds each member it made
    (``_concrete_members``): each row kept a task's object graph alive, 96 MB
    of pslist's RSS at 2,051 tasks, 540 MB of proc.Maps', where the cyclic GC
    re-traversed all of it in each full collection (5.9 s of 23 s).

    Each cell goes through :func:`plain_cell` as the grid takes the row from
    the plugin's generator (the grid's own ``_generator``, on this instance).
    A plain value is equal to the object, hashes alike, and renders alike:
    renderers format by the column's type, and ``json`` writes an int
    subclass through ``int.__repr__``. Rows of another length are left to the
    grid's own check.
    """
    generator = getattr(grid, "_generator", None)
    if generator is None or grid.populated:
        return
    column_types = [column.type for column in grid.columns]
    object_interface = interfaces.objects.ObjectInterface
    converts_as: dict = {}  # this grid's classes: see _converts_as

    def plain_rows(rows: Iterable) -> Iterator:
        for level, values in rows:
            if len(values) == len(column_types) and any(isinstance(v, object_interface) for v in values):
                values = [plain_cell(v, t, converts_as) for v, t in zip(values, column_types)]
            yield level, values

    grid._generator = plain_rows(generator)


def plugin_options(plugin_cls: type) -> list:
    """The user-settable requirements of a plugin (for command-line options)."""
    from volatility3.framework.configuration import requirements

    simple = (requirements.BooleanRequirement, requirements.IntRequirement,
              requirements.StringRequirement, requirements.ListRequirement,
              requirements.ChoiceRequirement)
    return [r for r in plugin_cls.get_requirements() if isinstance(r, simple)]


def quiet_volatility() -> None:
    """volatility3 logs at WARNING by default; keep our output clean unless asked."""
    logging.getLogger("volatility3").setLevel(logging.ERROR)
    constants.PARALLELISM = constants.Parallelism.Off



class DeferredModule(types.ModuleType):
    """A stand-in, in ``sys.modules``, for a module not imported yet: the real one is
    imported on the first attribute asked of it (and from then on is in ``sys.modules``).

    For modules stock volatility3 imports at start-up but most runs never use:
    ``volatility3.cli.text_renderer`` imports capstone (22 ms: a shared library
    through ctypes, and its constants) only to render Disassembly columns. The
    stdlib's ``LazyLoader`` cannot do this on Python 3.11: an ``import`` statement
    reads the module's ``__spec__``, which loads it. One difference remains: a
    capstone that is installed but cannot load fails where it is first used,
    instead of turning disassembly off at import (``CAPSTONE_PRESENT``).
    """

    def __getattr__(self, attr: str) -> Any:
        import sys

        if sys.modules.get(self.__name__) is self:
            sys.modules.pop(self.__name__, None)  # another thread may be here too
        return getattr(importlib.import_module(self.__name__), attr)

    @classmethod
    def install(cls, name: str) -> None:
        """Defer ``name`` (a top-level module); one already imported, or not installed,
        is left alone, so a stock ``import`` behaves as it always did without it."""
        import importlib.util
        import sys

        if name in sys.modules or "." in name:
            return
        spec = importlib.util.find_spec(name)
        if spec is None:
            return
        stand_in = cls(name)
        stand_in.__spec__ = spec
        sys.modules[name] = stand_in


def text_renderer() -> Any:
    """``volatility3.cli.text_renderer`` (stock), with capstone deferred to its first use."""
    DeferredModule.install("capstone")
    from volatility3.cli import text_renderer as module

    return module
