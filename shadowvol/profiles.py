"""The profile store: find, load and index ISF symbol tables.

Profiles live in ``<cache>/profiles/`` (written by ``vm build`` and
``profile build``) and in the repository's ``profiles/`` folder. Each is an
ISF JSON file (``.json`` or ``.json.xz``). Loading JSON on every run is too
slow for a sub-second command (9.8 MB of JSON: 0.26 s to parse, more with the
garbage collector running), so each profile gets a *lazy* copy in the cache,
keyed by the source file's size and mtime: every type and enum is its own
``marshal`` blob, decoded on first access, and the symbols are a hash table
read in place from the mapped copy (``symbols.SymbolIndex``). A plugin touches a few dozen of
the ~9,000 types and ~80,000 symbols, so loading costs milliseconds. The JSON
stays the interchange format that stock volatility3 reads.

The copies are a bounded cache: a load marks its copy used (its mtime), and
writing a new copy removes all but the :data:`FAST_COPIES_KEPT` most recently
used ones (copies of deleted or rebuilt profiles, and of older formats, would
otherwise pile up at ~12 MB each).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import lzma
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from . import paths, symbols
from .errors import ProfileError, ShadowvolError

REPO_PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def store_dir() -> Path:
    """``$SHADOWVOL_PROFILE_DIR`` if set (then the only place searched), else ``<cache>/profiles``."""
    env = os.environ.get("SHADOWVOL_PROFILE_DIR")
    if env:
        d = Path(env)
        d.mkdir(parents=True, exist_ok=True)
        return d
    return paths.private_dir(paths.cache_dir() / "profiles")


def profile_files() -> Iterator[Path]:
    dirs = [store_dir()] if os.environ.get("SHADOWVOL_PROFILE_DIR") else [store_dir(), REPO_PROFILES]
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.name.endswith((".json", ".json.xz")):
                    yield p


def _fast_path(path: Path) -> Path:
    st = path.stat()
    # |3: the format of symbols.FAST_MAGIC (copies in older formats are left unused, then pruned)
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|3".encode()).hexdigest()[:20]
    return paths.cache_dir() / "profile-cache" / f"{key}.marshal"


#: How many fast copies the cache keeps (the most recently used).
FAST_COPIES_KEPT = 32


def _prune_fast_copies(keep: Path) -> None:
    """Remove all but the :data:`FAST_COPIES_KEPT` most recently used fast copies
    (``keep`` stays whatever its age). Another run mapping a removed copy keeps
    its pages; one about to open it finds none and builds it again."""
    copies = []
    for p in keep.parent.glob("*.marshal"):
        try:
            copies.append((p.stat().st_mtime_ns, p))
        except OSError:
            pass  # removed meanwhile
    copies.sort(reverse=True)
    for _, p in copies[FAST_COPIES_KEPT:]:
        if p != keep:
            p.unlink(missing_ok=True)


def load_profile(path: Path) -> dict[str, Any]:
    """The ISF dict of a profile, through its lazy fast copy when fresh."""
    from .safeio import check_input

    path = check_input(path, "profile")  # a FIFO or device is refused before any open()
    fast = _fast_path(path)
    try:
        isf = symbols.load_fast(fast, mapped=True)
        try:
            os.utime(fast)  # used now: the cache keeps the most recently used copies
        except OSError:
            pass  # a read-only cache still serves
        return isf
    except (OSError, ShadowvolError):  # no fresh fast copy yet, or a corrupt one
        pass
    try:
        isf = symbols.read_profile(path)
        symbols.check_isf(isf, str(path))  # a fast file given as --profile skips parse_profile
    except (OSError, ValueError, lzma.LZMAError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    paths.private_dir(fast.parent)
    tmp = fast.with_suffix(f".{os.getpid()}.tmp")
    try:
        symbols.save_fast(isf, tmp)
        os.chmod(tmp, 0o600)
        tmp.replace(fast)
    finally:
        tmp.unlink(missing_ok=True)
    _prune_fast_copies(fast)
    return symbols.load_fast(fast, mapped=True)


def write_profile(isf: dict[str, Any], name: str) -> Path:
    """Store an ISF dict as ``<store>/<name>.json.xz`` and index it."""
    from .safeio import atomic_write

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", name) or ".." in name:
        raise ProfileError(f"invalid profile name {name[:80]!r}")
    out = store_dir() / f"{name}.json.xz"
    atomic_write(out, symbols.encode_profile(isf, xz=True))
    _update_index(out, isf)
    return out


def profile_banner(isf: dict[str, Any]) -> bytes:
    """The banner the profile was built for (without its trailing NUL)."""
    try:
        data = base64.b64decode(isf["symbols"]["linux_banner"]["constant_data"])
    except (KeyError, ValueError):
        raise ProfileError("the profile has no linux_banner constant_data") from None
    return data.rstrip(b"\0")


class SymbolAddresses(Mapping[str, int]):
    """Link-time address by symbol name, read from the ISF on demand (no full decode)."""

    def __init__(self, isf: dict[str, Any]) -> None:
        self._symbols = isf["symbols"]

    def __getitem__(self, name: str) -> int:
        return self._symbols[name]["address"]

    def __contains__(self, name: object) -> bool:
        return name in self._symbols

    def __iter__(self) -> Iterator[str]:
        return iter(self._symbols)

    def __len__(self) -> int:
        return len(self._symbols)


def profile_addresses(isf: dict[str, Any]) -> SymbolAddresses:
    return SymbolAddresses(isf)


def typed_symbols(isf: dict[str, Any]) -> set[str]:
    """Names of the symbols of an ISF that carry a type."""
    return {n for n, v in isf.get("symbols", {}).items() if isinstance(v, dict) and v.get("type")}


class TextSymbols:
    """Kernel-text symbols of one profile, sorted by link-time address.

    Built from the profile alone (no guest memory is read), on the first
    lookup. Whoever needs several lookups makes one and keeps it for as long
    as it uses that profile (one trace, one integrity check); nothing is
    cached on the target.
    """

    def __init__(self, isf: Any) -> None:
        self._isf = isf
        self._addrs: list[int] | None = None
        self._names: list[str] = []

    def _build(self) -> list[int]:
        if self._addrs is None:
            sym = self._isf["symbols"]
            lo, hi = sym["_stext"]["address"], sym["_etext"]["address"]
            pairs = sorted((v["address"], k) for k, v in sym.items()
                           if v.get("address") is not None and lo <= v["address"] < hi)
            self._addrs, self._names = [a for a, _ in pairs], [n for _, n in pairs]
        return self._addrs

    def enclosing(self, link_addr: int) -> tuple[int, str] | None:
        """(link-time start, name) of the text symbol at or before ``link_addr``, or None."""
        addrs = self._build()
        i = bisect.bisect_right(addrs, link_addr) - 1
        return (addrs[i], self._names[i]) if i >= 0 else None


def _index_path() -> Path:
    return store_dir() / "index.json"


def _update_index(path: Path, isf: dict[str, Any]) -> None:
    idx = _load_index()
    idx[str(path)] = {"banner": profile_banner(isf).decode(errors="replace"),
                      "mtime": path.stat().st_mtime_ns}
    _save_index(idx)


def _save_index(idx: dict[str, Any]) -> None:
    from .safeio import atomic_write

    atomic_write(_index_path(), json.dumps(idx, indent=1).encode())


def _load_index() -> dict[str, Any]:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def indexed_profiles() -> dict[Path, bytes]:
    """The banner of every stored profile, reading only files new or changed since indexed."""
    idx = _load_index()
    out: dict[Path, bytes] = {}
    changed = False
    for p in profile_files():
        mtime = p.stat().st_mtime_ns
        rec = idx.get(str(p))
        if rec is None or rec.get("mtime") != mtime:
            try:
                rec = {"banner": profile_banner(load_profile(p)).decode(errors="replace"), "mtime": mtime}
            except ProfileError:
                continue
            idx[str(p)] = rec
            changed = True
        out[p] = rec["banner"].encode(errors="replace")
    if changed:
        _save_index(idx)
    return out


def find_profile(banner: bytes) -> Path | None:
    """The stored profile whose banner is ``banner``."""
    want = banner.rstrip(b"\0")
    return next((p for p, b in indexed_profiles().items() if b == want), None)


def known_banners() -> list[bytes]:
    """Banners of the stored profiles (each once)."""
    return list(dict.fromkeys(indexed_profiles().values()))
