"""Fidelity: every stock volatility3 Linux plugin, live, against stock ``vol -f``.

The promise to an analyst is that a stock plugin run live gives the rows that
stock ``vol`` gives on a copy of the same RAM with the same profile. This
module measures it:

- :func:`stock_plugins` lists the stock Linux plugins of the installed
  volatility3 (deprecated aliases left out), with a one-line description.
- :func:`paused` pauses a VM for a consistent view and restores its state.
- :func:`raw_copy` writes guest-physical memory to a raw file that stock
  ``vol -f`` opens (holes stay sparse).
- :func:`sweep` runs each plugin live (``shadowvol -vm``) and with stock
  ``vol -f`` on the copy, and compares the rows order-insensitively.

Used by ``shadowvol bench sweep`` and by ``tests/live/test_fidelity.py``.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import ShadowvolError
from .safeio import atomic_copy

__all__ = ["PluginInfo", "SweepRow", "stock_plugins", "our_plugins", "raw_copy",
           "flatten_rows", "compare_rows", "sweep", "sweep_profiles", "PLUGIN_ARGS"]

#: Arguments for stock plugins that need some (the same on both sides).
#: ``{module_base}`` becomes the ``struct module`` address of a loaded module,
#: ``{cached_file}`` the path of a regular file with pages in the page cache.
PLUGIN_ARGS: dict[str, list[str]] = {
    "linux.vmaregexscan.VmaRegExScan": ["--pattern", "BusyBox v[0-9.]+"],
    "linux.module_extract.ModuleExtract": ["--base", "{module_base}"],
    "linux.pagecache.InodePages": ["--find", "{cached_file}", "--dump"],
}


@dataclass(frozen=True)
class PluginInfo:
    """One plugin: its full name (``linux.pslist.PsList``), where it comes from, what it does."""

    name: str
    origin: str  # "stock" or "shadowvol"
    description: str
    error: str = ""  # set when the plugin cannot even be imported (a missing optional library)


def _first_line(doc: str | None) -> str:
    lines = [ln.strip() for ln in (doc or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _plugin_classes(directory: Path, prefix: str) -> Iterator[tuple[str, Any, str]]:
    """(module name, plugin class or None, import error) for every module under ``directory``."""
    from volatility3.framework.constants import architectures  # noqa: F401  (plugins need it loaded)
    from volatility3.framework import interfaces

    for info in pkgutil.walk_packages([str(directory)], prefix):
        try:
            mod = importlib.import_module(info.name)
        except ImportError as exc:
            yield info.name, None, f"needs the Python module {exc.name or exc}"
            continue
        if not str(getattr(mod, "__file__", "")).startswith(str(directory)):
            continue  # a module of ours takes this name (our plugin dir comes first on the path)
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, interfaces.plugins.PluginInterface)
                    and obj.__module__ == mod.__name__):
                yield info.name, obj, ""


def stock_plugins(os_prefix: str = "linux") -> list[PluginInfo]:
    """Stock volatility3 plugins for ``os_prefix`` (deprecated renames left out)."""
    import volatility3
    from volatility3.framework import deprecation

    from . import volbridge

    volbridge.use_our_plugins()  # the plugin namespace as every run sees it: ours first
    directory = Path(volatility3.__file__).parent / "framework" / "plugins" / os_prefix
    base = "volatility3.plugins."
    out = []
    for mod_name, cls, err in _plugin_classes(directory, f"{base}{os_prefix}."):
        short = mod_name[len(base):]
        if cls is None:
            out.append(PluginInfo(short, "stock", "", err))
        elif not issubclass(cls, deprecation.PluginRenameClass):
            out.append(PluginInfo(f"{short}.{cls.__name__}", "stock", _first_line(cls.__doc__)))
    return sorted(out, key=lambda p: p.name)


def our_plugins() -> list[PluginInfo]:
    """shadowvol's own volatility3 plugins (``shadowvol/plugins/linux``, shipped with the package)."""
    from . import volbridge

    out = []
    for path in volbridge.our_plugin_files():
        mod_name = f"linux.{path.stem}"
        cls = volbridge.load_plugin(mod_name, ours_only=True)
        out.append(PluginInfo(f"{mod_name}.{cls.__name__}", "shadowvol", _first_line(cls.__doc__)))
    return sorted(out, key=lambda p: p.name)


# -- a consistent view ------------------------------------------------------


def raw_copy(memory: Any, path: Path, chunk: int = 16 << 20) -> int:
    """Write guest-physical memory to ``path`` as a raw (linear) image; returns bytes copied.

    Holes between RAM ranges are left as sparse zeros, as stock ``vol -f``
    reads a raw file linearly from physical address 0.
    """
    from .safeio import atomic_file

    copied = 0
    with atomic_file(path, 0o600, replace=False) as fh:
        fd = fh.fileno()
        end = 0
        for start, stop in memory.ranges():
            for pa in range(start, stop, chunk):
                n = min(chunk, stop - pa)
                os.pwrite(fd, memory.read_partial(pa, n).data, pa)
                copied += n
            end = max(end, stop)
        os.ftruncate(fd, end)
    return copied


# -- comparing rows ---------------------------------------------------------


def flatten_rows(rows: list[dict[str, Any]], depth: int = 0) -> list[str]:
    """JSON renderer rows (nested through ``__children``) as canonical strings."""
    out = []
    stack = [(r, depth) for r in reversed(rows)]
    while stack:
        row, d = stack.pop()
        children = row.get("__children") or []
        flat = {k: v for k, v in row.items() if k != "__children"}
        flat["__depth"] = d
        out.append(json.dumps(flat, sort_keys=True, default=str))
        stack.extend((c, d + 1) for c in reversed(children))
    return out


def compare_rows(live: list[str], dump: list[str]) -> tuple[bool, list[str], list[str]]:
    """Order-insensitive comparison: (identical, only live, only dump)."""
    a, b = collections.Counter(live), collections.Counter(dump)
    only_live = sorted((a - b).elements())
    only_dump = sorted((b - a).elements())
    return not only_live and not only_dump, only_live, only_dump


# -- the sweep --------------------------------------------------------------


@dataclass
class SweepRow:
    """One plugin, live against the dump."""

    plugin: str
    live_s: float = 0.0
    dump_s: float = 0.0
    live_rows: int = -1
    dump_rows: int = -1
    live_error: str = ""
    dump_error: str = ""
    verdict: str = ""  # identical | fails-as-stock | DIFFERENT | LIVE-FAILS | ...
    only_live: list[str] = field(default_factory=list)
    only_dump: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict in ("identical", "fails-as-stock")

    def as_dict(self, samples: int = 3) -> dict[str, Any]:
        d = asdict(self)
        d["only_live"] = self.only_live[:samples]
        d["only_dump"] = self.only_dump[:samples]
        return d


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int, float, str, str]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return p.returncode, time.perf_counter() - t0, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return -9, time.perf_counter() - t0, "", f"timed out after {timeout:.0f} s"


def _parse(rc: int, out: str, err: str) -> tuple[list[str] | None, str]:
    if rc != 0:
        return None, error_key(err) or f"exit {rc}"
    try:
        return flatten_rows(json.loads(out)), ""
    except ValueError:
        return None, f"not JSON: {_last_line(out) or _last_line(err)}"


_NOISE = ("Volatility 3 Framework", "No further results will be produced", "* ")


def error_key(stderr: str) -> str:
    """The essence of a failure, comparable between shadowvol's one-line errors and
    stock vol's (a traceback's last line, or its "symbol-related issue" paragraph)."""
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.strip().startswith(_NOISE)]
    if not lines:
        return ""
    text = lines[-1]
    for i, ln in enumerate(lines):
        if ln.startswith("Volatility experienced") and i + 1 < len(lines):
            text = lines[i + 1]
    text = text.split(" (SHADOWVOL_DEBUG")[0]
    for prefix in ("shadowvol: error: ", "internal error: ", "volatility3 ", "SymbolError: ",
                   "SymbolSpaceError: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if text.startswith("error inside volatility3 (") and "): " in text:
        text = text.split("): ", 1)[1]
    if "!" in text.split(":", 1)[0]:  # "table!name: Unknown symbol: name"
        text = text.split(": ", 1)[-1]
    return text.strip()


def vol_command() -> str:
    """Stock volatility3's ``vol`` beside our interpreter (or on PATH)."""
    vol = shutil.which("vol", path=os.path.dirname(sys.executable)) or shutil.which("vol")
    if not vol:
        raise ShadowvolError("stock volatility3 'vol' is not installed")
    return vol


def sweep(vm: str, workdir: Path, plugins: list[str] | None = None, backend: str = "shadow",
          timeout: float = 300.0, progress: Any = None, vol_cache: Path | None = None,
          connect: str | None = None) -> list[SweepRow]:
    """Pause ``vm``, copy its RAM, run every plugin live and with stock vol on the copy.

    The VM stays paused for the whole sweep (live and dump then see the same
    bytes) and is resumed afterwards if it was running. Stock vol gets a cache
    of its own in ``workdir`` (its shared cache is not safe for concurrent runs).
    """
    from .target import open_target, vm_paused

    say = progress or (lambda msg: None)
    names = plugins or [p.name for p in stock_plugins() if not p.error]
    vol = vol_command()
    workdir = Path(workdir)
    rows: list[SweepRow] = []
    # Paused before the target opens (a libvmi target on one of our VMs halts it itself); a
    # libvirt domain through libvirt, so libvirt's view of its state stays right.
    with vm_paused(vm, connect):
        # The copy for stock vol is the same paused RAM whichever backend the live runs use;
        # it is read through shadow (through libvmi on a libvirt domain it would be one xp
        # round trip per page: half an hour for 512 MiB).
        target = open_target(vm=vm, backend="shadow", connect=connect)
        try:
            raw = workdir / "guest.raw"
            say(f"copying guest RAM to {raw}")
            raw_copy(target.memory, raw)
            symdir = workdir / "symbols"
            (symdir / "linux").mkdir(parents=True, exist_ok=True)
            atomic_copy(target.profile_path, symdir / "linux" / target.profile_path.name, mode=0o600)
            placeholders = sweep_arguments(target)
        finally:
            target.close()
        # --partial: a warning about a cut walk or an error cell must not stop the
        # rows from being compared (stock vol prints them and exits 0).
        me = [sys.executable, "-m", "shadowvol", "-vm", vm, "--backend", backend, "-r", "json", "--partial",
              *(["--connect", connect] if connect else [])]
        cache = Path(vol_cache) if vol_cache else workdir / "vol-cache"
        cache.mkdir(parents=True, exist_ok=True)  # vol does not create it
        stock = [vol, "-q", "--offline", "--cache-path", str(cache),
                 "-f", str(raw), "-s", str(symdir), "-r", "json"]
        for name in names:
            args = [placeholders.get(a, a) for a in PLUGIN_ARGS.get(name, [])]
            row = SweepRow(name)
            say(f"{name}: live")
            live_dir = workdir / "out-live" / name
            dump_dir = workdir / "out-dump" / name
            live_dir.mkdir(parents=True, exist_ok=True)
            dump_dir.mkdir(parents=True, exist_ok=True)
            rc, row.live_s, out, err = _run(me + [name] + args, live_dir, timeout)
            live, row.live_error = _parse(rc, out, err)
            say(f"{name}: stock vol on the copy")
            rc, row.dump_s, out, err = _run(stock + [name] + args, dump_dir, timeout)
            dump, row.dump_error = _parse(rc, out, err)
            _judge(row, live, dump, live_dir, dump_dir, ("LIVE-FAILS", "DUMP-FAILS"))
            row.live_s, row.dump_s = round(row.live_s, 2), round(row.dump_s, 2)
            rows.append(row)
    return rows


def _judge(row: SweepRow, live: list[str] | None, dump: list[str] | None, live_dir: Path,
           dump_dir: Path, fails: tuple[str, str]) -> None:
    """The verdict of one plugin run both ways: rows (order-insensitive) and the
    files it wrote must match; two failures must be the same failure."""
    row.live_rows = -1 if live is None else len(live)
    row.dump_rows = -1 if dump is None else len(dump)
    if live is not None and dump is not None:
        same, row.only_live, row.only_dump = compare_rows(live, dump)
        files_same = _same_files(live_dir, dump_dir)
        row.verdict = "identical" if same and files_same else ("DIFFERENT" if not same else "DIFFERENT-FILES")
    elif live is None and dump is None:
        row.verdict = "fails-as-stock" if row.live_error == row.dump_error else "BOTH-FAIL-DIFFERENTLY"
    else:
        row.verdict = fails[0] if live is None else fails[1]


def _first_value(target: Any, plugin: str, column: int, keep: Any = lambda values: True) -> Any:
    """``values[column]`` of the first row of a plugin run on ``target`` that ``keep`` accepts."""
    from .run import run_plugin

    found: list[Any] = []

    def visit(node: Any, acc: list) -> list:
        if not acc and keep(node.values):
            acc.append(node.values[column])
        return acc

    run_plugin(target, plugin).populate(visit, found)
    return found[0] if found else None


def sweep_arguments(target: Any) -> dict[str, str]:
    """Values for :data:`PLUGIN_ARGS` placeholders, read from the guest itself."""
    module = _first_value(target, "linux.lsmod.Lsmod", 0)
    cached = _first_value(target, "linux.pagecache.Files", 12,
                          lambda v: str(v[5]) == "REG" and int(v[7] or 0) > 0)
    return {"{module_base}": hex(int(module)) if module is not None else "0",
            "{cached_file}": str(cached) if cached is not None else "/"}


def _file_digest(path: Path) -> str:
    """SHA-256 of a written file; of a tar archive, of its members (name, mode, size,
    bytes): gzip headers and the times at which the tool created entries differ run to run."""
    import hashlib
    import tarfile

    h = hashlib.sha256()
    if path.name.endswith((".tar", ".tar.gz", ".tgz")):
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    h.update(f"{m.name}|{m.type!r}|{m.mode:o}|{m.size}|{m.linkname}\n".encode())
                    if m.isfile():
                        h.update(tar.extractfile(m).read())
            return "tar:" + h.hexdigest()
        except (tarfile.TarError, OSError, EOFError):
            h = hashlib.sha256()
    h.update(path.read_bytes())
    return h.hexdigest()


def _same_files(a: Path, b: Path) -> bool:
    """Files a plugin wrote (``-o``): the same names and contents on both sides."""

    def digests(d: Path) -> dict[str, str]:
        return {p.name: _file_digest(p) for p in sorted(d.iterdir()) if p.is_file()}

    return digests(a) == digests(b)


def sweep_profiles(raw: Path, reference: Path, candidate: Path, workdir: Path,
                   plugins: list[str] | None = None, timeout: float = 600.0,
                   progress: Any = None) -> list[SweepRow]:
    """Stock ``vol -f RAW`` with two profiles of the same kernel (say DWARF and
    zero-config), plugin by plugin; the rows must be the same. In the rows
    returned, ``live_*`` is the candidate and ``dump_*`` the reference."""
    say = progress or (lambda msg: None)
    vol = vol_command()
    names = plugins or [p.name for p in stock_plugins() if not p.error]
    dirs = {}
    for label, profile in (("reference", reference), ("candidate", candidate)):
        d = Path(workdir) / f"symbols-{label}" / "linux"
        d.mkdir(parents=True, exist_ok=True)
        atomic_copy(profile, d / Path(profile).name, mode=0o600)
        dirs[label] = d.parent
    (Path(workdir) / "vol-cache").mkdir(exist_ok=True)  # vol does not create it
    rows = []
    for name in names:
        args = [a for a in PLUGIN_ARGS.get(name, []) if not a.startswith("{")]
        if len(args) != len(PLUGIN_ARGS.get(name, [])):
            continue  # needs a value read from a live guest
        row = SweepRow(name)
        results = {}
        for label in ("candidate", "reference"):
            say(f"{name}: {label} profile")
            out_dir = Path(workdir) / f"out-{label}" / name
            out_dir.mkdir(parents=True, exist_ok=True)
            rc, secs, out, err = _run([vol, "-q", "--offline", "--cache-path", str(Path(workdir) / "vol-cache"),
                                       "-f", str(raw), "-s", str(dirs[label]), "-r", "json",
                                       name, *args], out_dir, timeout)
            results[label] = (_parse(rc, out, err), round(secs, 2))
        (cand, row.live_error), row.live_s = results["candidate"]
        (ref, row.dump_error), row.dump_s = results["reference"]
        _judge(row, cand, ref, Path(workdir) / "out-candidate" / name, Path(workdir) / "out-reference" / name,
               ("CANDIDATE-FAILS", "REFERENCE-FAILS"))
        rows.append(row)
    return rows
