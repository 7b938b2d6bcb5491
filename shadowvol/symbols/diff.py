"""Comparing two ISF profiles on what plugins use (``shadowvol profile diff``).

Profile A is the reference (typically DWARF), B the candidate. Compared:

- **user types** (structs/unions) by name: size, and each field's offset and
  type *shape*. Anonymous members are flattened into their parent, as
  volatility3 6.2 does, so ``unnamed_field_N`` names (which differ between
  producers) never matter; anonymous types (``unnamed_*``) are compared by
  their own layout, never by name.
- **enums** by name: size and constants; **base types** by name: size,
  signedness, kind.
- **symbols** by name: present, address, typed or not, and the type's shape.

A shape is the kind, the name for named types, and pointee / element /
count for pointers and arrays (:func:`shape`).

Failures are what B lacks or gets wrong: differing entries and entries only
in A, or a symbol A types and B does not. What B knows beyond A (symbols
only in B, a type only B gives a symbol) is listed but is no failure.

:func:`stock_references` scans the installed volatility3 Linux plugins and
symbol extensions for the symbol and type names they look up, to restrict
the comparison to what stock plugins can touch.
"""

from __future__ import annotations

import ast
import json
import lzma
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowvol.errors import ProfileError

__all__ = ["load_isf", "shape", "flat_fields", "ProfileDiff", "diff_profiles", "stock_references",
           "render_text"]

_SECTIONS = ("base_types", "user_types", "enums", "symbols")
_KEYWORDS = ("struct ", "union ", "enum ")


def load_isf(path: str | Path) -> dict[str, Any]:
    """Reads an ISF (.json, .json.xz, or a shadowvol fast file).

    :raises ProfileError: missing file or not an ISF (one-line message).
    """
    from shadowvol.symbols import FAST_MAGIC, load_fast

    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: no such file")
    try:
        raw = p.read_bytes()
        if raw.startswith(FAST_MAGIC):
            isf = load_fast(p, lazy=False)
        else:
            if raw.startswith(b"\xfd7zXZ"):
                raw = lzma.decompress(raw)
            isf = json.loads(raw)
    except (OSError, lzma.LZMAError, ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{p}: not an ISF profile ({type(exc).__name__})") from None
    if not isinstance(isf, dict) or not all(isinstance(isf.get(k), dict) for k in _SECTIONS):
        raise ProfileError(f"{p}: not an ISF profile (needs {', '.join(_SECTIONS)})")
    return isf


def _anonymous(name: str) -> bool:
    return name.startswith("unnamed_")


def shape(isf: Mapping[str, Any], desc: Mapping[str, Any] | None, _depth: int = 0) -> Any:
    """The comparable shape of an ISF type descriptor (a nested tuple).

    Named structs/unions/enums are (kind, name); anonymous ones are (kind,
    size, their flattened fields' shapes); pointers, arrays and bitfields
    carry their target's shape.
    """
    if desc is None:
        return None
    kind = desc.get("kind")
    if kind == "pointer":
        return ("pointer", shape(isf, desc.get("subtype"), _depth))
    if kind == "array":
        return ("array", desc.get("count"), shape(isf, desc.get("subtype"), _depth))
    if kind == "bitfield":  # where its bits are: see placed()
        return ("bitfield", desc.get("bit_length"), shape(isf, desc.get("type"), _depth))
    if kind in ("struct", "union", "class", "enum"):
        name = desc.get("name", "")
        if not _anonymous(name):
            return (kind, name)
        if _depth > 8:
            return (kind, "?")
        if kind == "enum":
            e = isf["enums"].get(name) or {}
            return ("enum", e.get("size"), tuple(sorted((e.get("constants") or {}).items())))
        t = isf["user_types"].get(name) or {}
        return (kind, t.get("size"), tuple(sorted(
            (f,) + placed(isf, off, d, _depth + 1) for f, (off, d) in flat_fields(isf, name).items())))
    if kind == "base":
        return ("base", desc.get("name"))
    return (kind,)


def placed(isf: Mapping[str, Any], offset: int, desc: Mapping[str, Any], _depth: int = 0
           ) -> tuple[int, Any]:
    """(bit offset, shape) of a field. A bitfield's bits are placed
    absolutely: dwarf2json puts ``rtnl_link_state:16`` at byte 1258 bit 0,
    shadowvol at 1256 bit 16 (the enum's storage unit); the same bits."""
    bits = offset * 8
    if desc.get("kind") == "bitfield":
        bits += desc.get("bit_position") or 0
    return bits, shape(isf, desc, _depth)


def flat_fields(isf: Mapping[str, Any], type_name: str, _depth: int = 0
                ) -> dict[str, tuple[int, Mapping[str, Any]]]:
    """Field name -> (offset, type descriptor) of a user type, with the
    fields of anonymous members merged in at their offsets."""
    out: dict[str, tuple[int, Mapping[str, Any]]] = {}
    t = isf["user_types"].get(type_name)
    if not t or _depth > 8:
        return out
    for fname, f in (t.get("fields") or {}).items():
        desc = f.get("type") or {}
        offset = f.get("offset", 0)
        if f.get("anonymous") and desc.get("kind") in ("struct", "union"):
            for sub, (off, d) in flat_fields(isf, desc.get("name", ""), _depth + 1).items():
                out.setdefault(sub, (offset + off, d))
        else:
            out[fname] = (offset, desc)
    return out


@dataclass
class Counts:
    """identical / differing / only in A / only in B, for one kind of entry."""

    identical: int = 0
    differing: int = 0
    only_a: int = 0
    only_b: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"identical": self.identical, "differing": self.differing,
                "only_in_a": self.only_a, "only_in_b": self.only_b}


@dataclass
class ProfileDiff:
    """Result of :func:`diff_profiles`."""

    counts: dict[str, Counts] = field(default_factory=dict)
    #: category -> list of (name, what differs); categories end in
    #: ``_differing``, ``_only_in_a`` or ``_only_in_b``.
    details: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    restricted: bool = False
    unresolved: list[str] = field(default_factory=list)

    def note(self, category: str, name: str, what: str = "") -> None:
        self.details.setdefault(category, []).append((name, what))

    @property
    def failures(self) -> int:
        """Entries where B lacks or contradicts A (extras in B do not count;
        nor base types only A names: their users differ if it matters)."""
        return sum(c.differing + (0 if k == "base_types" else c.only_a) for k, c in self.counts.items())

    def as_dict(self) -> dict[str, Any]:
        return {"restricted_to_stock_plugins": self.restricted,
                "equivalent": self.failures == 0,
                "summary": {k: c.as_dict() for k, c in self.counts.items()},
                "differences": {k: [{"name": n, "detail": w} for n, w in v]
                                for k, v in sorted(self.details.items())},
                "referenced_but_in_neither": self.unresolved}


def _fmt(s: Any) -> str:
    """Short text for a shape."""
    if s is None:
        return "untyped"
    if not isinstance(s, tuple):
        return str(s)
    kind = s[0]
    if kind == "pointer":
        return _fmt(s[1]) + " *"
    if kind == "array":
        return f"{_fmt(s[2])}[{s[1]}]"
    if kind == "bitfield":
        return f"{_fmt(s[2])}:{s[1]}"
    if kind == "base":
        return str(s[1])
    if len(s) == 2:
        return f"{kind} {s[1]}"
    if kind in ("struct", "union"):
        return f"{kind} <anon, {s[1]} bytes, {len(s[2])} fields>"
    if kind == "enum":
        return f"enum <anon, {len(s[2])} constants>"
    return kind


def _bits(offset: int) -> str:
    return str(offset // 8) if offset % 8 == 0 else f"{offset // 8}+{offset % 8} bits"


def _record_one_sided(result: Any, kind: str, counts: Any, only_a: list[str], only_b: list[str]) -> None:
    """Count and note the ``kind`` entries only one profile has."""
    counts.only_a, counts.only_b = len(only_a), len(only_b)
    for name in only_a:
        result.note(f"{kind}_only_in_a", name)
    for name in only_b:
        result.note(f"{kind}_only_in_b", name)
    result.counts[kind] = counts


def _compare_keys(a: Iterable[str], b: Iterable[str], only: set[str] | None
                  ) -> tuple[list[str], list[str], list[str]]:
    sa, sb = set(a), set(b)
    if only is not None:
        sa &= only
        sb &= only
    return sorted(sa & sb), sorted(sa - sb), sorted(sb - sa)


def _diff_fields(result: Any, fc: Any, a: Mapping[str, Any], b: Mapping[str, Any], name: str) -> list[str]:
    """Compare the (flattened) fields of user type ``name``; what differs, for the type's note."""
    differs = []
    fa, fb = flat_fields(a, name), flat_fields(b, name)
    for f in sorted(set(fa) | set(fb)):
        if f not in fb:
            fc.only_a += 1
            result.note("fields_only_in_a", f"{name}.{f}", _fmt(shape(a, fa[f][1])))
            differs.append(f"no field {f}")
        elif f not in fa:
            fc.only_b += 1
            result.note("fields_only_in_b", f"{name}.{f}", _fmt(shape(b, fb[f][1])))
            differs.append(f"extra field {f}")
        else:
            (oa, sa), (ob, sb) = placed(a, *fa[f]), placed(b, *fb[f])
            if oa == ob and sa == sb:
                fc.identical += 1
                continue
            fc.differing += 1
            what = []
            if oa != ob:
                what.append(f"offset {_bits(oa)} vs {_bits(ob)}")
            if sa != sb:
                what.append(f"type {_fmt(sa)} vs {_fmt(sb)}")
            result.note("fields_differing", f"{name}.{f}", ", ".join(what))
            differs.append(f"field {f}")
    return differs


def _diff_user_types(result: Any, a: Mapping[str, Any], b: Mapping[str, Any], types_only: set[str] | None) -> None:
    """User types: kind, size and every field (counts ``types`` and ``fields``)."""
    tc, fc = Counts(), Counts()
    named = lambda isf: (n for n in isf["user_types"] if not _anonymous(n))  # noqa: E731
    common, only_a, only_b = _compare_keys(named(a), named(b), types_only)
    for name in common:
        ta, tb = a["user_types"][name], b["user_types"][name]
        differs = []
        if ta.get("kind") != tb.get("kind"):
            differs.append(f"kind {ta.get('kind')} vs {tb.get('kind')}")
        if ta.get("size") != tb.get("size"):
            differs.append(f"size {ta.get('size')} vs {tb.get('size')}")
        differs += _diff_fields(result, fc, a, b, name)
        if differs:
            tc.differing += 1
            result.note("types_differing", name, "; ".join(differs[:6]) + (" ..." if len(differs) > 6 else ""))
        else:
            tc.identical += 1
    for name in only_a:
        tc.only_a += 1
        result.note("types_only_in_a", name, f"{a['user_types'][name].get('size')} bytes")
    for name in only_b:
        tc.only_b += 1
        result.note("types_only_in_b", name, f"{b['user_types'][name].get('size')} bytes")
    result.counts["types"] = tc
    result.counts["fields"] = fc


def _diff_enums(result: Any, a: Mapping[str, Any], b: Mapping[str, Any], types_only: set[str] | None) -> None:
    """Named enums: size and constants."""
    ec = Counts()
    common, only_a, only_b = _compare_keys((n for n in a["enums"] if not _anonymous(n)),
                                           (n for n in b["enums"] if not _anonymous(n)), types_only)
    for name in common:
        ea, eb = a["enums"][name], b["enums"][name]
        ca, cb = ea.get("constants") or {}, eb.get("constants") or {}
        if ea.get("size") == eb.get("size") and ca == cb:
            ec.identical += 1
            continue
        ec.differing += 1
        what = [] if ea.get("size") == eb.get("size") else [f"size {ea.get('size')} vs {eb.get('size')}"]
        bad = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        if bad:
            what.append("constants " + ", ".join(f"{k}={ca.get(k)} vs {cb.get(k)}" for k in bad[:4])
                        + (" ..." if len(bad) > 4 else ""))
        result.note("enums_differing", name, "; ".join(what))
    _record_one_sided(result, "enums", ec, only_a, only_b)


def _diff_base_types(result: Any, a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """Base types, compared whole (a handful); pointer and void always."""
    bc = Counts()
    common, only_a, only_b = _compare_keys(a["base_types"], b["base_types"], None)
    for name in common:
        ba, bb = a["base_types"][name], b["base_types"][name]
        keys = ("size", "signed", "kind")
        if all(ba.get(k) == bb.get(k) for k in keys):
            bc.identical += 1
        else:
            bc.differing += 1
            result.note("base_types_differing", name,
                        ", ".join(f"{k} {ba.get(k)} vs {bb.get(k)}" for k in keys if ba.get(k) != bb.get(k)))
    # A base type only A names is no failure by itself: whatever of A uses
    # it shows up as a differing field or symbol.
    _record_one_sided(result, "base_types", bc, only_a, only_b)


def _diff_symbols(result: Any, a: Mapping[str, Any], b: Mapping[str, Any], syms_only: set[str] | None) -> None:
    """Symbols: address and type (a type or a length only B knows is noted, not a failure)."""
    sc = Counts()
    common, only_a, only_b = _compare_keys(a["symbols"], b["symbols"], syms_only)
    for name in common:
        sa, sb = a["symbols"][name], b["symbols"][name]
        what = []
        if sa.get("address") != sb.get("address"):
            what.append(f"address {sa.get('address', 0):#x} vs {sb.get('address', 0):#x}")
        ta, tb = shape(a, sa.get("type")), shape(b, sb.get("type"))
        if ta != tb:
            if tb is None:
                what.append(f"untyped in B (A: {_fmt(ta)})")
            elif ta is None:
                result.note("symbols_typed_only_in_b", name, _fmt(tb))
            elif ta[0] == tb[0] == "array" and ta[1] == 0 and ta[2] == tb[2]:
                # A has only an unbounded declaration ([0]); B knows a length.
                result.note("symbols_sized_only_in_b", name, f"{_fmt(ta)} vs {_fmt(tb)}")
            else:
                what.append(f"type {_fmt(ta)} vs {_fmt(tb)}")
        if what:
            sc.differing += 1
            result.note("symbols_differing", name, "; ".join(what))
        else:
            sc.identical += 1
    sc.only_a, sc.only_b = len(only_a), len(only_b)
    for name in only_a:
        result.note("symbols_only_in_a", name, _fmt(shape(a, a["symbols"][name].get("type"))))
    for name in only_b:
        result.note("symbols_only_in_b", name, _fmt(shape(b, b["symbols"][name].get("type"))))
    result.counts["symbols"] = sc


def diff_profiles(a: Mapping[str, Any], b: Mapping[str, Any],
                  only: tuple[set[str], set[str]] | None = None) -> ProfileDiff:
    """Compares ISF ``a`` (reference) with ``b``.

    :param only: (type names, symbol names) to restrict to; None compares all.
    """
    result = ProfileDiff(restricted=only is not None)
    types_only, syms_only = only if only is not None else (None, None)
    if types_only is not None:
        types_only = {t for t in types_only if not _anonymous(t)}
    _diff_user_types(result, a, b, types_only)
    _diff_enums(result, a, b, types_only)
    _diff_base_types(result, a, b)
    _diff_symbols(result, a, b, syms_only)
    if only is not None:
        every = set(a["symbols"]) | set(b["symbols"]) | set(a["user_types"]) | set(b["user_types"]) \
            | set(a["enums"]) | set(b["enums"]) | set(a["base_types"]) | set(b["base_types"])
        result.unresolved = sorted(((types_only or set()) | (syms_only or set())) - every)
    return result


# -- what stock volatility3 plugins reference --------------------------------------------------

_SYMBOL_CALLS = {"object_from_symbol", "get_symbol", "has_symbol", "get_symbol_address",
                 "get_symbols_by_name", "_get_symbol_address"}
_TYPE_CALLS = {"get_type", "has_type", "get_enumeration", "has_enumeration"}


def _is_ident(s: str) -> bool:
    return bool(s) and s.replace("_", "a").isalnum() and not s[0].isdigit()


def _clean(s: str) -> str:
    for kw in _KEYWORDS:
        if s.startswith(kw):
            return s[len(kw):]
    return s


def _bang(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "BANG"


class _RefVisitor(ast.NodeVisitor):
    """Collects the names stock code looks up, as symbols or types:
    ``object_from_symbol("x")`` / ``get_symbol`` / ``has_symbol`` /
    ``symbol_name="x"`` (symbols), ``get_type("x")`` / ``has_type`` /
    ``object_type="x"`` (types), ``table + constants.BANG + "x"`` and
    f-strings ``{constants.BANG}x`` (a symbol inside a symbol lookup, else a
    type); plus identifiers listed in list/tuple literals (names looked up
    in a loop, e.g. ``ops_structs = ["raw_seq_ops", ...]``)."""

    def __init__(self) -> None:
        self.symbols: set[str] = set()
        self.types: set[str] = set()
        self.listed: set[str] = set()
        self._ctx: list[str] = ["type"]

    def _add(self, node: ast.AST | None, ctx: str) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = _clean(node.value.strip())
            if _is_ident(name.replace(" ", "_")):
                (self.symbols if ctx == "symbol" else self.types).add(name)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        ctx = "symbol" if fname in _SYMBOL_CALLS else "type" if fname in _TYPE_CALLS else None
        if ctx is not None:
            for arg in node.args[:1]:
                self._add(arg, ctx)
        for kw in node.keywords:
            if kw.arg == "symbol_name":
                self._add(kw.value, "symbol")
            elif kw.arg in ("object_type", "type_name"):
                self._add(kw.value, "type")
            elif kw.arg == "name" and ctx is not None:
                self._add(kw.value, ctx)
        self._ctx.append(ctx or self._ctx[-1])
        self.generic_visit(node)
        self._ctx.pop()

    def visit_keyword(self, node: ast.keyword) -> None:
        ctx = "symbol" if node.arg == "symbol_name" else "type" if node.arg in (
            "object_type", "type_name") else self._ctx[-1]
        self._ctx.append(ctx)
        self.generic_visit(node)
        self._ctx.pop()

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.Add) and (_bang(node.left) or (
                isinstance(node.left, ast.BinOp) and _bang(node.left.right))):
            self._add(node.right, self._ctx[-1])
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        values = node.values
        for i, v in enumerate(values[:-1]):
            if isinstance(v, ast.FormattedValue) and _bang(v.value):
                self._add(values[i + 1], self._ctx[-1])
        self.generic_visit(node)

    def _literal_list(self, node: ast.List | ast.Tuple | ast.Set) -> None:
        items = [e for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if len(items) >= 2 and len(items) == len(node.elts):
            for e in items:
                if _is_ident(e.value) and "_" in e.value:
                    self.listed.add(e.value)
        self.generic_visit(node)

    visit_List = visit_Tuple = visit_Set = _literal_list


def stock_references(root: Path | None = None) -> tuple[set[str], set[str], set[str]]:
    """(symbol names, type names, identifiers listed in literals) that the
    installed volatility3's ``framework/plugins/linux`` and
    ``framework/symbols/linux`` look up. Listed identifiers count only
    where they are symbols of a profile.

    :raises ProfileError: volatility3 is not installed.
    """
    if root is None:  # volatility3's sources are read as text, never imported here
        from importlib.util import find_spec

        spec = find_spec("volatility3")
        if spec is None or not spec.submodule_search_locations:
            raise ProfileError("volatility3 is not installed: cannot list what stock plugins use")
        root = Path(list(spec.submodule_search_locations)[0])
    visitor = _RefVisitor()
    for sub in ("framework/plugins/linux", "framework/symbols/linux"):
        for path in sorted((root / sub).rglob("*.py")):
            try:
                visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
            except (SyntaxError, UnicodeDecodeError):
                continue
    return visitor.symbols, visitor.types, visitor.listed


def stock_scope(a: Mapping[str, Any], b: Mapping[str, Any], root: Path | None = None
                ) -> tuple[set[str], set[str]]:
    """(type names, symbol names) stock plugins can reach in profiles a/b:
    the names they look up, listed names that are symbols of either profile,
    and the named struct/union/enum behind each such symbol's type."""
    sym_refs, type_refs, listed = stock_references(root)
    syms = sym_refs | {n for n in listed if n in a["symbols"] or n in b["symbols"]}
    types = set(type_refs)
    for isf in (a, b):
        for s in syms:
            desc = (isf["symbols"].get(s) or {}).get("type")
            while isinstance(desc, dict) and desc.get("kind") in ("pointer", "array"):
                desc = desc.get("subtype")
            if isinstance(desc, dict) and desc.get("kind") in ("struct", "union", "enum") \
                    and not _anonymous(desc.get("name", "")):
                types.add(desc["name"])
    return types, syms


_ORDER = ("differing", "only_in_a", "only_in_b", "typed_only_in_b", "sized_only_in_b")


def render_text(d: ProfileDiff, a_name: str, b_name: str, limit: int = 40) -> str:
    """The human-readable report: summary table, then differences."""
    scope = "types and symbols stock volatility3 Linux plugins reference" if d.restricted else "everything"
    lines = [f"A: {a_name}", f"B: {b_name}", f"compared: {scope}", "",
             f"{'':12}{'identical':>10}{'differing':>10}{'only in A':>10}{'only in B':>10}"]
    for key, c in d.counts.items():
        lines.append(f"{key:12}{c.identical:>10}{c.differing:>10}{c.only_a:>10}{c.only_b:>10}")
    typed_b = len(d.details.get("symbols_typed_only_in_b", []))
    sized_b = len(d.details.get("symbols_sized_only_in_b", []))
    if typed_b or sized_b:
        lines.append(f"B knows more (not differences): {typed_b} symbols typed only in B, "
                     f"{sized_b} arrays sized only in B")
    lines.append("")
    lines.append("equivalent (nothing of A missing or different in B)" if d.failures == 0 else
                 f"NOT equivalent: {d.failures} entries of A missing or different in B")
    for cat in sorted(d.details, key=lambda c: (c.split("_")[0], next(
            (i for i, o in enumerate(_ORDER) if c.endswith(o)), 9))):
        items = d.details[cat]
        lines.append("")
        lines.append(f"{cat.replace('_', ' ')} ({len(items)}):")
        for name, what in items[:limit]:
            lines.append(f"  {name}" + (f": {what}" if what else ""))
        if len(items) > limit:
            lines.append(f"  ... {len(items) - limit} more (-r json lists all)")
    if d.unresolved:
        lines.append("")
        lines.append(f"referenced by stock plugins, in neither profile ({len(d.unresolved)}): "
                     + ", ".join(d.unresolved[:limit]) + (" ..." if len(d.unresolved) > limit else ""))
    return "\n".join(lines)
