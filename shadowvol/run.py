"""``shadowvol (-vm SPEC | -f DUMP) [options] PLUGIN [plugin options]``.

Only the requested plugin is imported; the profile comes from the fast store;
the kernel location from the per-boot cache. Each run is one snapshot epoch.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ShadowvolError
from .textsafe import printable, printable_type_renderers

RENDERERS = {
    "pretty": "PrettyTextRenderer",
    "quick": "QuickTextRenderer",
    "json": "JsonRenderer",
    "jsonl": "JsonLinesRenderer",
    "csv": "CSVRenderer",
}
#: The renderers for people: their cells show control characters as escapes (:mod:`.textsafe`).
TEXT_RENDERERS = ("pretty", "quick")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse but via our error path
        raise ShadowvolError(f"{self.prog}: {message}")


def _top_parser() -> argparse.ArgumentParser:
    from .target import add_source_options

    p = _Parser(prog="shadowvol", description="Run a Volatility 3 plugin on a live VM or a dump.")
    add_source_options(p)
    p.add_argument("-r", "--renderer", default="quick", choices=sorted(RENDERERS), help="default: quick")
    p.add_argument("-o", "--output-dir", default=".", metavar="DIR",
                   help="where plugins write the files they extract (as vol -o; default: here)")
    p.add_argument("-v", "--verbose", action="store_true", help="show volatility3 warnings")
    p.add_argument("--partial", action="store_true",
                   help="accept a dump shorter than its layout, or a walk cut short by unreadable "
                        "memory (a warning instead of exit 1 or 3)")
    p.add_argument("plugin", nargs="?")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _plugin_parser(plugin_cls: type, name: str) -> argparse.ArgumentParser:
    from volatility3.framework.configuration import requirements

    from .volbridge import plugin_options

    p = _Parser(prog=f"shadowvol ... {name}")
    for req in plugin_options(plugin_cls):
        flag = "--" + req.name.replace("_", "-")
        if not req.optional and req.default is None and not isinstance(req, requirements.BooleanRequirement):
            # e.g. linux.vmaregexscan --pattern: said here, not as an "unsatisfied requirement"
            p.add_argument(flag, dest=req.name, required=True, help=req.description,
                           **({"nargs": "+", "type": req.element_type}
                              if isinstance(req, requirements.ListRequirement) else
                              {"type": lambda s: int(s, 0)}
                              if isinstance(req, requirements.IntRequirement) else
                              {"choices": req.choices}
                              if isinstance(req, requirements.ChoiceRequirement) else {}))
        elif isinstance(req, requirements.BooleanRequirement):
            p.add_argument(flag, dest=req.name, action="store_true", default=None, help=req.description)
        elif isinstance(req, requirements.ListRequirement):
            p.add_argument(flag, dest=req.name, nargs="+", type=req.element_type, help=req.description)
        elif isinstance(req, requirements.IntRequirement):
            p.add_argument(flag, dest=req.name, type=lambda s: int(s, 0), help=req.description)
        elif isinstance(req, requirements.ChoiceRequirement):
            p.add_argument(flag, dest=req.name, choices=req.choices, help=req.description)
        else:
            p.add_argument(flag, dest=req.name, help=req.description)
    return p


def file_handler(output_dir: str) -> type:
    """A volatility3 file handler class writing into ``output_dir`` as ``vol -o``
    does (the plugin's file name; a taken name becomes ``NAME-1.EXT``...),
    but all or nothing (:class:`~shadowvol.safeio.AtomicFile`): the data is
    fsynced before its name appears, an existing file is never replaced, and
    a file the plugin failed while writing (its ``with`` block raised, or it
    was never closed: :meth:`discard_unclosed`) leaves nothing behind. Stock
    vol's handler renames an unsynced temp file and, on an error, still
    commits the half-written data under the final name."""
    from volatility3.framework import interfaces

    from .safeio import AtomicFile

    if not os.path.isdir(output_dir):
        raise ShadowvolError(f"output directory {output_dir} does not exist (-o DIR)")
    out_dir = os.path.abspath(output_dir)
    pending: list[AtomicFile] = []

    class AtomicFileHandler(interfaces.plugins.FileHandlerInterface):
        def __init__(self, filename: str) -> None:
            super().__init__(filename)
            self._atomic = AtomicFile(os.path.join(out_dir, "shadowvol-output"), mode=0o600)
            pending.append(self._atomic)

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            return self._atomic.file.write(data)

        def seek(self, offset: int, whence: int = 0) -> int:
            return self._atomic.file.seek(offset, whence)

        def tell(self) -> int:
            return self._atomic.file.tell()

        def seekable(self) -> bool:
            return True

        def truncate(self, size: int | None = None) -> int:
            return self._atomic.file.truncate(size)

        def flush(self) -> None:
            if not self.closed:
                self._atomic.file.flush()

        def close(self) -> None:
            if self.closed:
                return
            try:
                final = self._atomic.commit(os.path.join(out_dir, self.preferred_filename),
                                            replace=False, unique=True)
                self.preferred_filename = final.name  # what the plugin reports in its row
            finally:
                pending.remove(self._atomic)
                super().close()

        def __exit__(self, exc_type, exc_value, traceback) -> None:
            if exc_type is None:
                self.close()
                return
            # the stock handler commits here too (half a file under its final name)
            self._atomic.discard()
            pending.remove(self._atomic)
            super().close()

        @staticmethod
        def discard_unclosed() -> int:
            """Drop files a plugin opened and never closed; returns how many."""
            n = len(pending)
            while pending:
                pending.pop().discard()
            return n

    return AtomicFileHandler


# Cells stock plugins fill with a failure instead of raising (pslist/proc/elfs
# --dump: "Error outputting file"; pagecache: "Error dumping cached pages ...").
ERROR_CELLS = ("Error outputting file",)
ERROR_CELL_PREFIXES = ("Error dumping cached pages",)


class RunHealth:
    """What failed underneath a stock plugin that the plugin itself may have swallowed.

    - ``faults``: kernel-layer validity checks and reads that found no readable
      memory. Plugins probe unmapped addresses on purpose (``is_valid``
      checks, user pages swapped out), so this count alone proves nothing.
    - ``broken_walks``: a stock walk over a kernel structure that memory cut
      short, where the stock code ends it quietly (``return``, ``break``,
      ``continue``) instead of raising:

      * ``list_head.to_list``, ``hlist_head.to_list``, the pre-6.1
        ``mm_struct`` VMA list: after the head, a link into unreadable memory;
        in a circular ``list_head``, also a NULL ``next`` (an initialised list
        never has one: list_del poisons, list_del_init points at itself);
      * the maple tree (``mm_struct.mm_mt``: ``proc.Maps``, ``elfs``,
        ``malfind``...): a node that cannot be read, or whose parent pointer
        is not the node it was reached from (stock skips that subtree);
      * the XArray / radix tree of an IDR (``pidhashtable``, ``ebpf``, the
        page cache): a head or slot that cannot be read (stock ``continue``);
      * a red-black tree (``rb_root.get_nodes``): a child that cannot be read.

      Kernel structures are never so in a consistent snapshot: the walk was
      cut short by a truncated dump, smear, or corruption.
    - ``error_cells``: cells holding a stock plugin's error text.
    - ``unreadable_cells``: ``UnreadableValue`` / ``UnparsableValue`` cells
      (legitimate, e.g. psaux when a process's argv page is not resident).

    Nothing stock is patched: the kernel layer's ``is_valid`` and ``read``
    are wrapped on the instance, and the walk is recognised by the code
    object of a frame on the stack, its state read from that frame's locals.
    """

    #: Frames looked at above a read or validity check for a walk: the
    #: walk's own frame is at most this far up (is_readable: 2; a member or
    #: object read through StructType/Context, templates, the Pointer's
    #: constructor, _unmarshall and the layer container: 7 to 9).
    DEPTH = 10
    NULL = bytes(8)

    def __init__(self) -> None:
        self.faults = 0
        self.broken_walks: list[str] = []
        self.error_cells: list[str] = []
        self.unreadable_cells = 0
        #: The plugin itself ended on unreadable memory (a stock walk that raises
        #: instead of stopping: the maple tree, struct reads): what and where.
        self.aborted: str | None = None
        self._walks: dict | None = None
        self._links: dict | None = None
        self._canonical = None
        self._mask = -1

    def watch_layer(self, layer) -> None:
        """Observe ``layer``'s ``is_valid`` and ``read`` (instance attributes; the class is untouched)."""
        from volatility3.framework import exceptions

        is_valid, read = layer.is_valid, layer.read
        NULL = self.NULL
        self._canonical = getattr(layer, "canonicalize", None)
        self._mask = getattr(layer, "address_mask", -1)  # what a stock Pointer's value is cut to
        self._codes()

        def checked_is_valid(offset: int, length: int = 1) -> bool:
            ok = is_valid(offset, length)
            if not ok:
                self.faults += 1
                self._check_walk(sys._getframe(1), offset)
            return ok

        def checked_read(offset: int, length: int, pad: bool = False) -> bytes:
            try:
                data = read(offset, length, pad)
            except exceptions.InvalidAddressException:
                self.faults += 1
                self._check_walk(sys._getframe(1), offset, failed_read=True)
                raise
            # A pointer some walk is about to follow? Only two kinds are looked at,
            # so most reads cost two comparisons: a NULL (a list link) and one at
            # the 256-byte alignment of a maple node (its parent pointer).
            if length == 8 and (data == NULL or not offset & 0xFF):
                self._check_link(sys._getframe(1), offset, data)
            return data

        layer.is_valid = checked_is_valid
        layer.read = checked_read

    def _codes(self) -> None:
        if self._walks is not None:
            return
        from volatility3.framework.symbols import linux
        from volatility3.framework.symbols.linux import extensions as ext

        # code -> how that walk reports a link it could not follow (is_valid
        # false or a read raising), given the frame's locals; None: a probe.
        self._walks = {
            # the local each list walk sets once it has read its head
            ext.list_head.to_list.__code__: self._list_cut,
            ext.hlist_head.to_list.__code__: self._hlist_cut,
            ext.mm_struct._get_mmap_iter.__code__: self._vma_list_cut,
            ext.maple_tree._parse_maple_tree_node.__code__: self._maple_cut,
            linux.IDStorage._iter_node.__code__: self._idr_slot_cut,
            linux.IDStorage.get_entries.__code__: self._idr_head_cut,
            ext.rb_root._walk_nodes.__code__: self._rb_cut,
        }
        # code -> check of a pointer the walk read successfully
        self._links = {
            ext.list_head.to_list.__code__: self._list_null_link,
            ext.maple_tree._parse_maple_tree_node.__code__: self._maple_parent,
        }

    #: What stock walks say, and only say (a log warning), when they stop on
    #: inconsistent memory: the maple tree walk meeting a node twice (a cycle,
    #: the subtree skipped) or going deeper than the tree's recorded height.
    LOGGER = "volatility3.framework.symbols.linux.extensions"
    LOG_SIGNS = (("has all ready been seen", "maple tree: a node reached twice (a cycle), its subtree skipped"),
                 ("a depth of", "maple tree deeper than its recorded height"))

    def watching_log(self):
        """A ``with`` block during which the warnings of :data:`LOG_SIGNS` are
        noted as broken walks. They are let through to the user only as they
        would have been (``-v``); the logger's level and filters are restored."""
        import contextlib
        import logging

        health = self

        class Signs(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                text = record.getMessage()
                for sign, note in health.LOG_SIGNS:
                    if sign in text:
                        health._note(f"{note}: {text.split(',')[0].removeprefix('The ')}")
                return record.levelno >= shown_from

        @contextlib.contextmanager
        def scope():
            nonlocal shown_from
            logger = logging.getLogger(self.LOGGER)
            level = logger.level
            shown_from = logger.getEffectiveLevel()
            signs = Signs()
            logger.addFilter(signs)
            logger.setLevel(min(shown_from, logging.WARNING))
            try:
                yield self
            finally:
                logger.removeFilter(signs)
                logger.setLevel(level)

        shown_from = 0
        return scope()

    def _addr(self, a: int) -> int:
        return self._canonical(a) if self._canonical is not None else a

    def _note(self, note: str) -> None:
        if note not in self.broken_walks:
            self.broken_walks.append(note)

    def _check_walk(self, frame, offset: int, failed_read: bool = False) -> None:
        self._check_frames(self._walks, frame, offset, failed_read)

    def _check_link(self, frame, offset: int, data: bytes) -> None:
        self._check_frames(self._links, frame, offset, data)

    def _check_frames(self, checks, frame, offset: int, extra) -> None:
        """The first of ``DEPTH`` frames up whose code has a check: its note, if any, is kept."""
        checks = checks or {}
        for _ in range(self.DEPTH):
            if frame is None:
                return
            check = checks.get(frame.f_code)
            if check is not None:
                note = check(frame.f_locals, offset, extra)
                if note:
                    self._note(note)
                return
            frame = frame.f_back

    # -- the walks, each from its frame's locals -----------------------------------------------

    def _list_what(self, local: dict) -> str:
        head = local.get("self")
        where = f" at {self._addr(head.vol.offset):#x}" if head is not None else ""
        return f"list of {str(local.get('symbol_type', '?')).split('!')[-1]}.{local.get('member', '?')}{where}"

    def _list_cut(self, local: dict, offset: int, failed: bool) -> str | None:
        if "direction" not in local:  # still at the head: the plugin probing an address
            return None
        return f"{self._list_what(local)} stopped at unreadable {self._addr(offset):#x}"

    def _hlist_cut(self, local: dict, offset: int, failed: bool) -> str | None:
        return self._list_cut(dict(local, direction=1), offset, failed) if "current" in local else None

    def _list_null_link(self, local: dict, offset: int, data: bytes) -> str | None:
        """list_head.to_list reading a link once past the head (``seen`` set): NULL
        ends the stock walk quietly (``if not link_ptr: break``)."""
        if data != self.NULL or "seen" not in local:
            return None
        return f"{self._list_what(local)} stopped at a NULL link at {self._addr(offset):#x} (a circular list)"

    def _vma_list_cut(self, local: dict, offset: int, failed: bool) -> str | None:
        if "seen" not in local:
            return None
        mm = local.get("self")
        where = f" of mm {self._addr(mm.vol.offset):#x}" if mm is not None else ""
        return f"VMA list{where} stopped at unreadable {self._addr(offset):#x}"

    def _maple_what(self, local: dict) -> str:
        tree = local.get("self")
        return f"maple tree at {self._addr(tree.vol.offset):#x}" if tree is not None else "maple tree"

    def _maple_cut(self, local: dict, offset: int, failed: bool) -> str | None:
        if "pointer" not in local:
            return None
        return f"{self._maple_what(local)}: node {self._addr(local['pointer']):#x} unreadable at {self._addr(offset):#x}"

    def _maple_parent(self, local: dict, offset: int, data: bytes) -> str | None:
        """The stock walk reads a node's parent first and, if it is not the node
        it came from, skips the subtree (``return None``): say so."""
        pointer = local.get("pointer")
        if pointer is None or "node_parent_mte" in local or offset != pointer:
            return None
        tree, parent = local.get("self"), local.get("parent")
        mask = getattr(tree, "MAPLE_NODE_POINTER_MASK", 0xFF)
        got = int.from_bytes(data, "little") & self._mask & ~mask
        if parent is None or got == parent:
            return None
        return (f"{self._maple_what(local)}: node {self._addr(pointer):#x} has parent {self._addr(got):#x}, "
                f"reached from {self._addr(parent):#x}")

    def _idr_slot_cut(self, local: dict, offset: int, failed: bool) -> str | None:
        node = local.get("node")  # (``nodep`` is reused for each child)
        if not failed or "off" not in local or node is None:
            return None
        return (f"radix tree/XArray node {self._addr(node.vol.offset):#x}: slot {local['off']} "
                f"unreadable at {self._addr(offset):#x}")

    def _idr_head_cut(self, local: dict, offset: int, failed: bool) -> str | None:
        if not local.get("nodep"):
            return None
        root = local.get("root")
        where = f" at {self._addr(root.vol.offset):#x}" if root is not None else ""
        return f"radix tree/XArray{where}: head node unreadable at {self._addr(offset):#x}"

    def _rb_cut(self, local: dict, offset: int, failed: bool) -> str | None:
        if not local.get("root_node"):
            return None
        tree = local.get("self")
        where = f" at {self._addr(tree.vol.offset):#x}" if tree is not None else ""
        return f"red-black tree{where}: node unreadable at {self._addr(offset):#x}"

    def watch_grid(self, grid) -> None:
        """Check every row a renderer visits (``grid.populate`` wrapped on the instance)."""
        from volatility3.framework import interfaces

        populate = grid.populate
        names = [c.name for c in grid.columns]

        def checked_populate(function=None, initial_accumulator=None, fail_on_errors: bool = True):
            def visit(node, acc):
                for name, value in zip(names, node.values):
                    if isinstance(value, str):
                        if value in ERROR_CELLS or value.startswith(ERROR_CELL_PREFIXES):
                            self.error_cells.append(f"{name}: {value}")
                    elif isinstance(value, interfaces.renderers.BaseAbsentValue):
                        if type(value).__name__ in ("UnreadableValue", "UnparsableValue"):
                            self.unreadable_cells += 1
                return function(node, acc) if function is not None else acc
            return populate(visit, initial_accumulator, fail_on_errors)

        grid.populate = checked_populate

    def problems(self) -> list[str]:
        """One-line descriptions of what makes the answer incomplete (empty when it is whole)."""
        out = []
        if self.aborted:
            out.append(f"the plugin stopped at unreadable memory, the answer is incomplete: {self.aborted}")
        elif self.broken_walks:  # (an abort names the first broken walk itself)
            more = f" (+{len(self.broken_walks) - 1} more)" if len(self.broken_walks) > 1 else ""
            what = ("a walk ran into unreadable memory" if "unreadable" in self.broken_walks[0]
                    else "a walk met a broken link (smear or corruption)")
            out.append(f"{what}, the answer may be incomplete: {self.broken_walks[0]}{more}")
        if self.error_cells:
            more = f" (+{len(self.error_cells) - 1} more)" if len(self.error_cells) > 1 else ""
            out.append(f"the plugin reported a failure in its output: {self.error_cells[0]}{more}")
        return out


def run_plugin(target, plugin_name: str, options: dict | None = None, output_dir: str | None = None,
               health: RunHealth | None = None, handler: type | None = None):
    """Run a plugin on a :class:`~shadowvol.target.Target`; returns the TreeGrid
    (rows come as a renderer populates it). ``handler``: a :func:`file_handler`
    class for the files it writes (default: one for ``output_dir``), whose
    ``discard_unclosed()`` the caller runs once the grid is rendered."""
    from . import volbridge

    plugin_cls = volbridge.load_plugin(plugin_name)
    ctx = volbridge.build_context(target.memory, target.kernel, target.location, target.isf,
                                  isf_url=target.profile_path.as_uri())
    if health is not None:
        health.watch_layer(ctx.layers[volbridge.KERNEL_LAYER])
    if handler is None and output_dir is not None:
        handler = file_handler(output_dir)
    plugin = volbridge.construct_plugin(ctx, plugin_cls, options or {}, file_handler=handler)
    grid = plugin.run()
    volbridge.detach_rows(grid)
    if health is not None:
        health.watch_grid(grid)
    return grid


def _check_writable(output_dir: str) -> None:
    """``-o DIR`` given: a file can be created there (stock plugins turn a failed write into a cell)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise ShadowvolError(f"cannot write files into {output_dir} (-o DIR): {exc.strerror}") from None


OTHER_OS = {"windows": "Windows", "mac": "macOS"}


def check_plugin_os(plugin_cls: type, vm: str | None) -> None:
    """A Windows or macOS plugin on a Linux target: one line saying so (not its SymbolError)."""
    import importlib.util

    from .safeio import short

    parts = plugin_cls.__module__.split(".")
    if len(parts) < 4 or parts[:2] != ["volatility3", "plugins"] or parts[2] not in OTHER_OS:
        return
    name = ".".join(parts[2:])
    target = f"{short(vm, 40)} is a Linux guest" if vm else "shadowvol reads Linux memory only"
    hint = "use a linux.* plugin ('shadowvol plugins' lists them)"
    twin = "linux." + ".".join(parts[3:])
    try:
        if importlib.util.find_spec("volatility3.plugins." + twin) is not None:
            hint = f"use {twin} ('shadowvol plugins' lists the linux.* plugins)"
    except (ImportError, ValueError):
        pass
    raise ShadowvolError(f"{name} is a {OTHER_OS[parts[2]]} plugin and {target}: {hint}")


def _one_shot_gc() -> None:
    """Garbage collection for one command in its own process (the CLI), set once the
    plugin is built and before it runs.

    volatility3 builds an object for every member it reads, and parent and
    member refer to each other, so the cyclic GC runs often. By default each
    full collection re-traverses everything alive: modules, the profile, the
    context and its symbol table (about 0.5 s of pslist's 3 s at 2,000
    tasks). Those live until exit, so they are frozen (``gc.freeze``), and full
    collections wait for 100 young ones instead of 10: young cycles (a task's
    member objects) are still collected, by the cheap generations. Measured
    with ``gc.callbacks``: 0.57 -> 0.12 s in pslist, 0.52 -> 0.09 s in psaux,
    same peak memory. Not for long-lived processes (watch, tests).
    """
    import gc

    gc.freeze()
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, 100)


def _render_with_retry(target, args, popts: dict, live: bool) -> "RunHealth":
    """Run and render the plugin; on a live guest, once more in a new epoch if a walk broke.

    A running guest changes under a walk (a task unlinked while we follow its
    list: the link reads LIST_POISON). The output is kept until the run is
    done, so a second look replaces the first; a run that wrote files (-o)
    is not repeated, and its break is reported as is. A plugin that raises
    on unreadable memory keeps the rows it rendered and is reported like a
    broken walk (exit 3 unless ``--partial``), not as an internal error.
    """
    import contextlib
    import io

    from volatility3.framework import exceptions

    from .volbridge import text_renderer as stock_text_renderer

    text_renderer = stock_text_renderer()
    attempts = 2 if live else 1
    for attempt in range(attempts):
        health = RunHealth()
        before = set(os.listdir(args.output_dir))
        out = io.StringIO()
        handler = file_handler(args.output_dir)
        try:
            with health.watching_log():
                grid = run_plugin(target, args.plugin, popts, health=health, handler=handler)
                _one_shot_gc()
                renderer = getattr(text_renderer, RENDERERS[args.renderer])()
                if args.renderer in TEXT_RENDERERS:  # guest strings shown on a terminal: see textsafe
                    renderer._type_renderers = printable_type_renderers(renderer._type_renderers)
                with contextlib.redirect_stdout(out):
                    renderer.render(grid)
        except exceptions.InvalidAddressException as exc:
            # Memory the plugin needed is not there (a hole or the end of a dump,
            # smear): the rows so far stand, and the answer is reported as partial.
            where = f"{exc.invalid_address:#x} in {exc.layer_name}"
            health.aborted = f"{health.broken_walks[0]}, then {where}" if health.broken_walks else where
        finally:
            handler.discard_unclosed()  # a file the plugin never closed is not half-written output
        wrote_files = set(os.listdir(args.output_dir)) != before
        if not (health.broken_walks or health.aborted) or attempt == attempts - 1 or wrote_files:
            break
        target.new_epoch()  # forget the translations of the smeared look
    sys.stdout.write(out.getvalue())
    sys.stdout.flush()
    return health


def find_kernel_image(target) -> "os.PathLike[str] | None":
    """The vmlinuz the target's kernel was booted from, if we have it: the image of a VM we
    started, else a cached image of the profile's kernel release (the banner names it)."""
    from pathlib import Path

    from .vm.image import images_dir

    if target.vm is not None and target.vm.image:
        found = Path(target.vm.image) / "vmlinuz"
        if found.is_file():
            return found
    import re

    from .profiles import profile_banner

    try:
        m = re.match(rb"Linux version ([\w.+~-]+) ", profile_banner(target.isf))
    except ShadowvolError:
        return None
    release = m.group(1).decode("ascii") if m else ""
    if not release or release.startswith("."):
        return None
    found = images_dir() / release / "vmlinuz"
    return found if found.is_file() else None


def _kernel_image_option(plugin_cls: type, plugin: str, popts: dict, target) -> None:
    """A plugin that compares kernel text (``--kernel-image``) gets the decompressed kernel image:
    the one the user named, else the one :func:`find_kernel_image` finds. Without one,
    linux.check_text stops here with one line; malware_report runs its other checks and says so."""
    from .symbols.vmlinuz import kernel_payload_file
    from .volbridge import plugin_options

    if not any(req.name == "kernel_image" for req in plugin_options(plugin_cls)):
        return
    given = popts.get("kernel_image")
    found = given or find_kernel_image(target)
    if found is None:
        if plugin_cls.__name__ == "CheckText":
            raise ShadowvolError(f"{plugin} needs the kernel image the guest booted and none was found for it: "
                                 "pass --kernel-image PATH (its vmlinuz from the linux-image package, or vmlinux)")
        return
    popts["kernel_image"] = str(kernel_payload_file(found))


def printable_volatility_log() -> None:
    """volatility3's log lines on stderr as stock shows them (the message alone,
    WARNING and up: what ``logging.lastResort`` prints), through
    :func:`~shadowvol.textsafe.printable`: they quote guest strings too. Set by
    the ``shadowvol`` command (:func:`shadowvol.cli.entry`) for its own process."""
    import logging

    class PrintableStderr(logging.StreamHandler):
        """A StreamHandler on whatever ``sys.stderr`` is when it writes (as lastResort)."""

        stream = property(lambda self: sys.stderr, lambda self, value: None)

        def format(self, record: logging.LogRecord) -> str:
            return printable(super().format(record), layout=True)

    logger = logging.getLogger("volatility3")
    if any(type(h).__name__ == "PrintableStderr" for h in logger.handlers):
        return
    handler = PrintableStderr()
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False


def run_plugin_cli(argv: list[str]) -> int:
    args = _top_parser().parse_args(argv)
    if not args.plugin:
        raise ShadowvolError("which plugin? e.g. shadowvol -vm NAME linux.pslist "
                             "('shadowvol plugins' lists them all)")
    if not os.path.isdir(args.output_dir):
        raise ShadowvolError(f"output directory {args.output_dir} does not exist (-o DIR)")
    if args.output_dir != ".":  # given: probe it (a pslist run without -o never writes in the cwd)
        _check_writable(args.output_dir)
    from . import volbridge
    from .target import open_target

    if not args.verbose:
        volbridge.quiet_volatility()
    try:
        plugin_cls = volbridge.load_plugin(args.plugin)
    except ModuleNotFoundError as exc:  # a stock plugin's optional dependency (vmayarascan: yara)
        raise ShadowvolError(f"{args.plugin} needs the Python module {exc.name!r}, which is not "
                             "installed (as stock vol; for yara: pip install yara-python)") from None
    check_plugin_os(plugin_cls, args.vm)
    popts = {k: v for k, v in vars(_plugin_parser(plugin_cls, args.plugin).parse_args(args.args)).items()
             if v is not None}
    target = open_target(vm=args.vm, dump=args.dump, backend=args.backend, profile=args.profile,
                         partial=args.partial, connect=args.connect)
    for warning in target.warnings:
        print(f"shadowvol: warning: {warning}", file=sys.stderr)
    try:
        _kernel_image_option(plugin_cls, args.plugin, popts, target)
        health = _render_with_retry(target, args, popts, live=args.vm is not None)
    finally:
        target.close()
    if args.verbose and health.faults:
        print(f"shadowvol: note: {health.faults} checks or reads found no readable kernel memory "
              "(plugins probe on purpose: not an error by itself)", file=sys.stderr)
    if args.verbose and health.unreadable_cells:
        print(f"shadowvol: note: {health.unreadable_cells} cells unreadable", file=sys.stderr)
    problems = health.problems()
    for problem in problems:
        print(f"shadowvol: warning: {printable(problem)}"  # a cell's text: the guest's
              + ("" if args.partial else " (--partial accepts it)"), file=sys.stderr)
    return 3 if problems and not args.partial else 0
