"""volatility3's object model, made fast underneath stock plugins (issue 12).

Every stock plugin reads the kernel through volatility3's objects: a member
access builds an ``ObjectInformation``, a ChainMap behind the object's
``vol``, and the member object itself, and reads its bytes. Each function here
is a drop-in replacement for one volatility3 method, with the same
semantics and the same errors; :func:`adapt_volatility3` installs them when a
live context is built (never at import), and keeps the stock method as
``__wrapped__`` where tests compare against it. ``tests/unit/test_voladapt.py``
checks each against stock; the live fidelity sweep compares every stock
plugin's rows with stock ``vol -f``. Each is written so it could be offered
upstream as it is.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from volatility3.framework import interfaces


def _object_information_contains(cls: type) -> Any:
    """``ObjectInformation.__contains__`` with the field names computed once
    (stock builds ``dataclasses.fields()`` on every call: 607k calls for pslist at
    2,000 tasks, a third of its time). Subclasses get their own fields."""
    names = frozenset(f.name for f in dataclasses.fields(cls))

    def __contains__(self: Any, key: str) -> bool:
        if type(self) is cls:
            return key in names
        return key in frozenset(f.name for f in dataclasses.fields(self))

    return __contains__


def _read_only_mapping_getattr(self: Any, attr: str) -> Any:
    """``ReadOnlyMapping.__getattr__`` with one lookup instead of ``in`` then ``[]``
    (each walks the ChainMap behind every object's ``vol``)."""
    if attr == "_dict":
        return object.__getattribute__(self, attr)
    mapping = self._dict
    if type(mapping) is VolChainMap:
        mapping = mapping._flat if mapping._flat is not None else (mapping.flat() or mapping)
    try:
        return mapping[attr]
    except KeyError:
        raise AttributeError(f"Object has no attribute: {self.__class__.__name__}.{attr}") from None


def _aggregate_getattr(stock: Any) -> Any:
    """``AggregateType.__getattr__`` reading ``self._vol`` once per member access.

    Stock reads ``self.vol.<key>`` six times per access, each building a
    ReadOnlyMapping over the ChainMap; the logic is otherwise the same, and
    anything but a member (an unknown attribute) goes to the stock method, so
    errors are stock's own.
    """
    from volatility3.framework.interfaces.objects import ObjectInformation
    from volatility3.framework.objects import templates

    def __getattr__(self: Any, attr: str) -> Any:
        if attr in ("_concrete_members", "vol", "_vol"):
            return stock(self, attr)
        concrete = self._concrete_members
        if attr in concrete:
            return concrete[attr]
        if attr.startswith("_") and not attr.startswith("__") and "__" in attr:
            attr = attr[attr.find("__", 1):]  # See volatility3 issue #522
        vol = self._vol
        if type(vol) is VolChainMap:  # one dict lookup per key (see VolChainMap)
            vol = vol._flat if vol._flat is not None else (vol.flat() or vol)
        members = vol["members"]
        if attr not in members:
            return stock(self, attr)
        layer_name = vol["layer_name"]
        mask = self._context.layers[layer_name].address_mask
        relative_offset, template = members[attr]
        if isinstance(template, templates.ReferenceTemplate):
            template = self._context.symbol_space.get_type(template.vol.type_name)
        object_info = ObjectInformation(
            layer_name=layer_name, offset=mask & (vol["offset"] + relative_offset), member_name=attr,
            parent=self, native_layer_name=vol["native_layer_name"] or layer_name, size=template.size)
        member = template(context=self._context, object_info=object_info)
        concrete[attr] = member
        return member

    __getattr__.__wrapped__ = stock  # type: ignore[attr-defined]
    return __getattr__


def _template_call(self: Any, context: Any, object_info: Any) -> Any:
    """``ObjectTemplate.__call__`` over ``self._vol`` directly (stock goes through a
    new ReadOnlyMapping per argument, and iterates the ChainMap).

    A template's ``_vol`` is a ChainMap of plain dicts: merging them from the
    last to the first gives the same keys, in the same order, with the same
    (first-map-wins) values as iterating the ChainMap.
    """
    vol = self._vol
    flat = vol.flat() if type(vol) is VolChainMap else None
    if flat is not None:
        arguments = dict(flat)
        object_class = arguments.pop("object_class")
        return object_class(context=context, object_info=object_info, **arguments)
    maps = vol.maps
    if all(type(m) is dict for m in maps):
        arguments: dict[str, Any] = {}
        for m in reversed(maps):
            arguments.update(m)
        object_class = arguments.pop("object_class")
    else:
        arguments = {arg: vol[arg] for arg in vol if arg != "object_class"}
        object_class = vol["object_class"]
    return object_class(context=context, object_info=object_info, **arguments)


def _template_size(self: Any) -> int:
    """``ObjectTemplate.size`` without building a ReadOnlyMapping."""
    vol = self._vol
    if type(vol) is VolChainMap:
        vol = vol._flat if vol._flat is not None else (vol.flat() or vol)
    return vol["object_class"].VolTemplateProxy.size(self)


def _epoch_cached_boottime(stock: Any) -> Any:
    """``task_struct._get_boottime_raw`` read once per epoch (one run's context).

    Stock re-reads ``tk_core`` for every task (``get_create_time``: 0.4 ms per
    task). The boot time is a property of the kernel, not of the task; within
    one epoch (one snapshot) it is one value. Contexts that are not ours (stock
    ``vol``) keep the stock behaviour. A copy is returned, so a caller can
    never alter the cached value.
    """
    from volatility3.framework.symbols.linux.extensions import Timespec64Concrete

    def _get_boottime_raw(self: Any) -> Any:
        cache = getattr(self._context, "epoch_cache", None)
        if cache is None:
            return stock(self)
        key = ("task_struct._get_boottime_raw", self.vol.layer_name, self.get_symbol_table_name())
        if key not in cache:
            cache[key] = stock(self)
        value = cache[key]
        return value if value is None else Timespec64Concrete(value.tv_sec, value.tv_nsec)

    _get_boottime_raw.__wrapped__ = stock  # type: ignore[attr-defined]
    return _get_boottime_raw


_ObjectInformation = interfaces.objects.ObjectInformation
_OBJECT_INFORMATION_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(_ObjectInformation))
_OBJECT_INFORMATION_FIELDS = frozenset(_OBJECT_INFORMATION_FIELD_ORDER)


class VolChainMap(collections.ChainMap):
    """The ChainMap behind every object's and template's ``vol``, looked up in one dict.

    volatility3 builds these in two places only (``ObjectInterface.__init__``:
    ``{}, vol_info, object_info, kwargs``; ``Template.__init__``: ``{}, arguments,
    {type_name}``), from maps that nobody else holds, and writes only through
    the map itself (``_vol[k] = v``, ``update_vol``), which lands in
    ``maps[0]``. Such a *sealed* map is flattened once, on its first lookup,
    into one dict with ChainMap's first-map-wins values and iteration order;
    its own writes keep the flat dict current. Maps derived by ``new_child``,
    ``parents`` or ``copy`` share other maps' dicts, so they look up map by
    map, as stock does (without stock's raised and caught KeyError per map).
    An ``ObjectInformation`` (a dataclass, not a mapping) contributes its
    fields, as its ``__contains__``/``__getitem__`` expose them.
    """

    def __init__(self, *maps: Any) -> None:
        self.maps = list(maps) or [{}]
        self._flat: dict | None = None
        self._sealed = True

    def _flatten(self) -> dict | None:
        flat: dict = {}
        for mapping in reversed(self.maps):
            if type(mapping) is dict:
                flat.update(mapping)
            elif type(mapping) is _ObjectInformation:
                for name in _OBJECT_INFORMATION_FIELD_ORDER:
                    flat[name] = getattr(mapping, name)
            else:
                self._sealed = False  # a mapping of another kind: look up map by map
                return None
        self._flat = flat
        return flat

    def _lookup(self, key: Any) -> Any:
        for mapping in self.maps:
            if type(mapping) is _ObjectInformation:
                if key in _OBJECT_INFORMATION_FIELDS:
                    return getattr(mapping, key)
            elif key in mapping:
                return mapping[key]
        return self.__missing__(key)

    def __getitem__(self, key: Any) -> Any:
        flat = self._flat
        if flat is None:
            flat = self._flatten() if self._sealed else None
            if flat is None:
                return self._lookup(key)
        try:
            return flat[key]
        except KeyError:
            return self.__missing__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: Any) -> bool:
        flat = self._flat
        if flat is None:
            flat = self._flatten() if self._sealed else None
            if flat is None:
                return any(key in m for m in self.maps)
        return key in flat

    def flat(self) -> dict | None:
        """The merged dict (read only), or None when this map is not sealed."""
        flat = self._flat
        if flat is None and self._sealed:
            flat = self._flatten()
        return flat

    # Writes go to maps[0], as ChainMap's; the flat dict follows them.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.maps[0][key] = value
        if self._flat is not None:
            self._flat[key] = value

    def __delitem__(self, key: Any) -> None:
        self._flat = None
        super().__delitem__(key)

    def popitem(self) -> Any:
        self._flat = None
        return super().popitem()

    def pop(self, key: Any, *args: Any) -> Any:
        self._flat = None
        return super().pop(key, *args)

    def clear(self) -> None:
        self._flat = None
        super().clear()

    def __ior__(self, other: Any) -> "VolChainMap":
        self._flat = None
        return super().__ior__(other)

    # Derived maps share dicts with this one: never flattened.
    @staticmethod
    def _unsealed(derived: "VolChainMap") -> "VolChainMap":
        derived._sealed = False
        derived._flat = None
        return derived

    def new_child(self, m: Any = None, **kwargs: Any) -> "VolChainMap":
        return self._unsealed(super().new_child(m, **kwargs))

    @property
    def parents(self) -> "VolChainMap":
        return self._unsealed(super().parents)

    def copy(self) -> "VolChainMap":
        return self._unsealed(super().copy())

    __copy__ = copy


class _CollectionsWithVolChainMap:
    """``collections`` as volatility3's ``interfaces.objects`` sees it: ChainMap is
    :class:`VolChainMap` (a subclass: isinstance checks and ``new_child`` hold)."""

    ChainMap = VolChainMap

    def __getattr__(self, name: str) -> Any:
        return getattr(collections, name)


def adapt_volatility3() -> None:
    """Speed up volatility3's object model without changing any result.

    Contained adaptations, each a drop-in replacement with the same semantics
    (``tests/unit/test_voladapt.py`` checks them against the stock methods and
    stock plugin output), written so they could be offered upstream as they
    are. Applied when a context is built (idempotent), never at import.
    """
    from volatility3.framework.interfaces import objects as iobjects
    from volatility3.framework.objects import AggregateType, templates

    if getattr(AggregateType.__getattr__, "__wrapped__", None) is not None:
        return  # already adapted in this process
    iobjects.ObjectInformation.__contains__ = _object_information_contains(  # type: ignore[method-assign]
        iobjects.ObjectInformation)
    iobjects.ReadOnlyMapping.__getattr__ = _read_only_mapping_getattr  # type: ignore[method-assign]
    AggregateType.__getattr__ = _aggregate_getattr(AggregateType.__getattr__)  # type: ignore[method-assign]
    templates.ObjectTemplate.__call__ = _template_call  # type: ignore[method-assign]
    templates.ObjectTemplate.size = property(_template_size)  # type: ignore[method-assign,assignment]
    from volatility3.framework.symbols.linux.extensions import task_struct

    task_struct._get_boottime_raw = _epoch_cached_boottime(  # type: ignore[method-assign]
        task_struct._get_boottime_raw)
    if not isinstance(getattr(iobjects, "collections", None), _CollectionsWithVolChainMap):
        iobjects.collections = _CollectionsWithVolChainMap()  # type: ignore[assignment]
