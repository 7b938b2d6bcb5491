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
from volatility3.framework.objects import templates


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
    errors are stock's own. A member, once built, is also kept in the
    instance ``__dict__`` under the name asked for: the next access is a
    plain attribute lookup, not a failed lookup (an AttributeError raised and
    caught) and then this call; ``task.pid`` and the like are asked for
    several times per task (pslist: 21 of 42 member accesses a task).
    :func:`_aggregate_dir` keeps ``dir()`` stock's. Stock never empties
    ``_concrete_members``, so the two always agree.
    """
    from volatility3.framework.interfaces.objects import ObjectInformation
    from volatility3.framework.objects import templates

    def __getattr__(self: Any, attr: str) -> Any:
        if attr in ("_concrete_members", "vol", "_vol"):
            return stock(self, attr)
        concrete = self._concrete_members
        if attr in concrete:
            member = concrete[attr]
            self.__dict__[attr] = member  # the next access is a plain attribute lookup
            return member
        asked = attr
        if attr.startswith("_") and not attr.startswith("__") and "__" in attr:
            attr = attr[attr.find("__", 1):]  # See volatility3 issue #522
        vol = self._vol
        if type(vol) is VolChainMap:  # one dict lookup per key (see VolChainMap)
            vol = vol._flat if vol._flat is not None else (vol.flat() or vol)
        members = vol["members"]
        if attr not in members:
            return stock(self, attr)
        layer_name = vol["layer_name"]
        context = self._context
        mask = context.layers[layer_name].address_mask
        relative_offset, template = members[attr]
        if isinstance(template, templates.ReferenceTemplate):
            template = context.symbol_space.get_type(template.vol.type_name)
        offset = mask & (vol["offset"] + relative_offset)
        native_layer_name = vol["native_layer_name"] or layer_name
        tvol = template._vol
        plan = None
        if type(template) is _ObjectTemplate and type(tvol) is VolChainMap:
            plan = tvol._plan
            if plan is None:
                plan = _plan(template, tvol)
        if plan and plan[3] is not _UNSIZED:  # what the stock steps (else) do, in one call
            make, object_class, tflat, size = plan
            member = make(object_class, context, tflat, layer_name, offset, native_layer_name, attr, self, size)
        else:
            object_info = ObjectInformation(
                layer_name=layer_name, offset=offset, member_name=attr,
                parent=self, native_layer_name=native_layer_name, size=template.size)
            member = template(context=context, object_info=object_info)
        concrete[attr] = member
        if asked is attr:
            self.__dict__[attr] = member
        return member

    __getattr__.__wrapped__ = stock  # type: ignore[attr-defined]
    return __getattr__


def _aggregate_dir(stock: Any) -> Any:
    """``AggregateType.__dir__`` for objects whose members :func:`_aggregate_getattr`
    also keeps in the instance ``__dict__``: stock's list (``object.__dir__``, then
    the type's members), without a second entry for each member kept there."""
    def __dir__(self: Any) -> list:
        own = self.__dict__
        concrete = own.get("_concrete_members") or {}
        names = [n for n in object.__dir__(self) if n not in concrete or own.get(n) is not concrete[n]]
        return names + list(self.vol.members)

    __dir__.__wrapped__ = stock  # type: ignore[attr-defined]
    return __dir__


def _template_call(self: Any, context: Any, object_info: Any) -> Any:
    """``ObjectTemplate.__call__`` over ``self._vol`` directly (stock goes through a
    new ReadOnlyMapping per argument, and iterates the ChainMap).

    A template's ``_vol`` is a ChainMap of plain dicts: merging them from the
    last to the first gives the same keys, in the same order, with the same
    (first-map-wins) values as iterating the ChainMap. The commonest objects
    (integers, pointers, structures of stock classes) are built by
    :func:`_maker` without the constructor chain.
    """
    vol = self._vol
    flat = (vol._flat or vol.flat()) if type(vol) is VolChainMap else None
    if flat is not None:
        if type(object_info) is _ObjectInformation:
            plan = vol._plan
            if plan is None:
                plan = _plan(self, vol)
            if plan:
                return plan[0](plan[1], context, plan[2], object_info.layer_name, object_info.offset,
                               object_info.native_layer_name, object_info.member_name, object_info.parent,
                               object_info.size)
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


def _new_vol(obj: Any, context: Any, type_name: str, object_info: Any, kwargs: dict) -> None:
    """What ``ObjectInterface.__init__`` sets: ``_vol`` (already flattened when it can be) and ``_context``.

    The merged dict of ``ChainMap({}, {type_name, offset}, object_info, kwargs)``
    is written as one dict display: kwargs' keys first, then the
    ObjectInformation's fields in their order, then ``type_name``, with the
    first map's values winning (the normalized offset), as ChainMap iterates
    and looks up. Only the dataclass's fields are read, as ChainMap's lookup
    through ``ObjectInformation.__getitem__`` sees them.
    """
    offset = object_info.offset & context.layers[object_info.layer_name].address_mask
    vol = _new_object(VolChainMap)
    vol.maps = [{}, {"type_name": type_name, "offset": offset}, object_info, kwargs]
    if type(object_info) is _ObjectInformation and _FIELDS_AS_WRITTEN:
        vol._flat = {**kwargs, "layer_name": object_info.layer_name, "offset": offset,
                     "native_layer_name": object_info.native_layer_name, "member_name": object_info.member_name,
                     "parent": object_info.parent, "size": object_info.size, "type_name": type_name}
    obj._vol = vol
    obj._context = context


def _born(obj: Any, context: Any, kind: int, type_name: str, layer_name: str, offset: int,
          native_layer_name: str, member_name: str | None, parent: Any, size: int | None, a: Any, b: Any,
          flat: dict) -> None:
    """What ``ObjectInterface.__init__`` sets, for an object a maker builds: ``_context``
    and a sealed :class:`VolChainMap` holding its merged dict (``flat``, written
    out by the maker in ChainMap's key order with first-map-wins values). Its
    ``maps`` (``{}`` or a pointer's ``{subtype}``, ``{type_name, offset}``, the
    ``ObjectInformation``, the constructor's arguments) are built from ``_parts``
    on first use (see :func:`_maps_of_parts`): nothing but the map itself reads them."""
    vol = _new_object(VolChainMap)
    vol._parts = (kind, type_name, offset, flat["offset"], layer_name, native_layer_name, member_name, parent,
                  size, a, b)
    vol._flat = flat
    obj._vol = vol
    obj._context = context


_PRIMITIVE, _POINTER, _AGGREGATE = 0, 1, 2


def _maps_of_parts(parts: tuple) -> list:
    """The ChainMap maps stock ``ObjectInterface.__init__`` (and ``Pointer.__init__``) build."""
    kind, type_name, offset, masked, layer_name, native_layer_name, member_name, parent, size, a, b = parts
    return [{"subtype": b} if kind == _POINTER else {}, {"type_name": type_name, "offset": masked},
            _ObjectInformation(layer_name=layer_name, offset=offset, native_layer_name=native_layer_name,
                               member_name=member_name, parent=parent, size=size),
            {"size": a, "members": b} if kind == _AGGREGATE else {"data_format": a}]


def _make_primitive(cls: type, context: Any, flat: dict, layer_name: str, offset: int, native_layer_name: str,
                    member_name: str | None, parent: Any, size: int | None) -> Any:
    """``cls(context, object_info, type_name=..., data_format=...)`` for a class with
    PrimitiveObject's ``__new__`` and ``__init__``: the same steps, in one call."""
    data_format = flat["data_format"]
    object_info = _ObjectInformation(layer_name=layer_name, offset=offset, native_layer_name=native_layer_name,
                                     member_name=member_name, parent=parent, size=size)
    value = cls._unmarshall(context, data_format, object_info)
    obj = cls._struct_type.__new__(cls, value)
    obj._PrimitiveObject__new_value = value
    _new_vol(obj, context, flat["type_name"], object_info, {"data_format": data_format})
    obj._data_format = data_format
    return obj


def _make_integer(cls: type, context: Any, flat: dict, layer_name: str, offset: int, native_layer_name: str,
                  member_name: str | None, parent: Any, size: int | None) -> Any:
    """:func:`_make_primitive` for an int class with PrimitiveObject's ``_unmarshall``,
    whose read and conversion (``context.layers.read``, ``convert_data_to_value``:
    ``int.from_bytes``) are written out."""
    data_format = flat["data_format"]
    length = data_format.length
    layer = context.layers[layer_name]
    data = layer.read(offset, length, False) if length > 0 else b""
    value = int.from_bytes(data, byteorder=data_format.byteorder, signed=data_format.signed)
    obj = int.__new__(cls, value)
    obj._PrimitiveObject__new_value = value
    type_name = flat["type_name"]
    _born(obj, context, _PRIMITIVE, type_name, layer_name, offset, native_layer_name, member_name, parent, size,
          data_format, None,
          {"data_format": data_format, "layer_name": layer_name, "offset": offset & layer.address_mask,
           "native_layer_name": native_layer_name, "member_name": member_name, "parent": parent, "size": size,
           "type_name": type_name})
    obj._data_format = data_format
    return obj


def _make_pointer(cls: type, context: Any, flat: dict, layer_name: str, offset: int, native_layer_name: str,
                  member_name: str | None, parent: Any, size: int | None) -> Any:
    """``cls(context, object_info, type_name=..., data_format=..., subtype=...)`` for
    a class with PrimitiveObject's ``__new__`` and Pointer's ``__init__``."""
    obj = _make_primitive(cls, context, flat, layer_name, offset, native_layer_name, member_name, parent, size)
    obj._vol["subtype"] = flat["subtype"]
    obj._cache = {}
    return obj


def _make_plain_pointer(cls: type, context: Any, flat: dict, layer_name: str, offset: int, native_layer_name: str,
                        member_name: str | None, parent: Any, size: int | None) -> Any:
    """:func:`_make_pointer` for a class with Pointer's ``_unmarshall`` and
    ``_get_raw_value``, written out: the raw value read from ``layer_name`` and
    cut to the native layer's address mask."""
    data_format = flat["data_format"]
    layers = context.layers
    mask = layers[native_layer_name].address_mask
    length, endian, signed = data_format
    if signed:
        raise ValueError("Pointers cannot have signed values")
    layer = layers[layer_name]
    value = int.from_bytes(layer.read(offset, length, False), byteorder=endian, signed=signed) & mask
    obj = int.__new__(cls, value)
    obj._PrimitiveObject__new_value = value
    type_name, subtype = flat["type_name"], flat["subtype"]
    _born(obj, context, _POINTER, type_name, layer_name, offset, native_layer_name, member_name, parent, size,
          data_format, subtype,
          {"data_format": data_format, "layer_name": layer_name, "offset": offset & layer.address_mask,
           "native_layer_name": native_layer_name, "member_name": member_name, "parent": parent, "size": size,
           "type_name": type_name, "subtype": subtype})
    obj._data_format = data_format
    obj._cache = {}
    return obj


def _make_aggregate(cls: type, context: Any, flat: dict, layer_name: str, offset: int, native_layer_name: str,
                    member_name: str | None, parent: Any, size: int | None) -> Any:
    """``cls(context, object_info, type_name=..., size=..., members=...)`` for a class
    with object's ``__new__`` and AggregateType's ``__init__`` (structs, unions
    and volatility3's extension classes of them: task_struct, list_head...).
    The object's ``size`` (the ObjectInformation's) wins over the type's, as in ChainMap."""
    obj = cls.__new__(cls)
    type_name, members = flat["type_name"], flat["members"]
    _born(obj, context, _AGGREGATE, type_name, layer_name, offset, native_layer_name, member_name, parent, size,
          flat["size"], members,
          {"size": size, "members": members, "layer_name": layer_name,
           "offset": offset & context.layers[layer_name].address_mask, "native_layer_name": native_layer_name,
           "member_name": member_name, "parent": parent, "type_name": type_name})
    obj._concrete_members = {}
    return obj


#: object class -> (how to build it from a template's flat vol, the number of
#: keys that vol has: the constructor's arguments and object_class); a template
#: with other keys, or a class without a maker (None, -1), takes the stock
#: constructor.
_MAKER_OF_CLASS: dict[type, Any] = {}


def _maker(object_class: type) -> Any:
    from volatility3.framework.objects import AggregateType, Pointer, PrimitiveObject

    make, n_keys = None, -1
    if not _FIELDS_AS_WRITTEN:  # another volatility3: its own constructors
        _MAKER_OF_CLASS[object_class] = (make, n_keys)
        return make, n_keys
    new, init = object_class.__new__, object_class.__init__
    unmarshall = getattr(getattr(object_class, "_unmarshall", None), "__func__", None)
    if new is PrimitiveObject.__new__ and init is PrimitiveObject.__init__:
        make, n_keys = _make_primitive, 3  # object_class, type_name, data_format
        if object_class._struct_type is int and issubclass(object_class, int) \
                and unmarshall is PrimitiveObject._unmarshall.__func__:
            make = _make_integer
    elif new is PrimitiveObject.__new__ and init is Pointer.__init__:
        make, n_keys = _make_pointer, 4  # + subtype
        if issubclass(object_class, int) and unmarshall is Pointer._unmarshall.__func__ \
                and object_class._get_raw_value.__func__ is Pointer._get_raw_value.__func__:
            make = _make_plain_pointer
    elif new is object.__new__ and init is AggregateType.__init__:
        make, n_keys = _make_aggregate, 4  # object_class, type_name, size, members
    _MAKER_OF_CLASS[object_class] = (make, n_keys)
    return make, n_keys


_UNSIZED = object()  # a plan's size when the template's size raises (the stock path raises it)


def _plan(template: Any, tvol: "VolChainMap") -> Any:
    """How ``template`` builds its objects, kept on its vol until the vol is written
    to: ``(maker, object_class, the template's flat vol, template.size)``, or
    False when the stock constructor must (a class without a maker, a template
    holding other arguments, a vol that is not sealed)."""
    flat = tvol.flat()
    if flat is None:
        return False
    object_class = flat["object_class"]
    make, n_keys = _MAKER_OF_CLASS.get(object_class) or _maker(object_class)
    if make is None or len(flat) != n_keys:
        plan: Any = False
    else:
        try:
            size = template.size
        except Exception:  # noqa: BLE001 (raised again, as stock raises it, where a size is needed)
            size = _UNSIZED
        plan = (make, object_class, flat, size)
    tvol._plan = plan
    return plan


def _flat_vol(vol: Any) -> Any:
    """The one dict behind a sealed :class:`VolChainMap` (else the map itself)."""
    if type(vol) is VolChainMap:
        flat = vol._flat
        if flat is not None:
            return flat
        return vol.flat() or vol
    return vol


def _primitive_size(vol: Any) -> int:
    return vol["data_format"].length  # PrimitiveObject/Pointer: template.vol.data_format.length


def _aggregate_size(vol: Any) -> int:
    size = vol.get("size", None)  # AggregateType: template.vol.size, which must be set
    if size is None:
        raise ValueError("ObjectTemplate not provided with a size")
    return size


#: object class -> its template size read straight from the template's vol, for
#: classes whose ``VolTemplateProxy.size`` is one of the stock functions below
#: (None: the class has its own; it is called as stock calls it).
_SIZE_OF_CLASS: dict[type, Any] = {}


def _size_reader(object_class: type) -> Any:
    from volatility3.framework.objects import AggregateType, Integer, Pointer, PrimitiveObject

    stock = {PrimitiveObject.VolTemplateProxy.size.__func__: _primitive_size,
             Pointer.VolTemplateProxy.size.__func__: _primitive_size,  # Integer's, by definition
             Integer.VolTemplateProxy.size.__func__: _primitive_size,
             AggregateType.VolTemplateProxy.size.__func__: _aggregate_size}
    reader = stock.get(getattr(object_class.VolTemplateProxy.size, "__func__", None))
    _SIZE_OF_CLASS[object_class] = reader
    return reader


def _template_size(self: Any) -> int:
    """``ObjectTemplate.size`` without building a ReadOnlyMapping.

    For the stock size functions of integers, pointers and structures (most
    templates), the size is read from the template's vol directly and kept
    there until the vol is written to (it depends on that vol alone); a
    missing key falls back to the stock function, so its error is stock's own.
    """
    chain = self._vol
    if type(chain) is VolChainMap:
        size = chain._size
        if size is not None:
            return size
    vol = _flat_vol(chain)
    object_class = vol["object_class"]
    try:
        reader = _SIZE_OF_CLASS[object_class]
    except KeyError:
        reader = _size_reader(object_class)
    if reader is not None:
        try:
            size = reader(vol)
        except (KeyError, AttributeError):
            pass
        else:
            if type(chain) is VolChainMap and chain._sealed:
                chain._size = size
            return size
    return object_class.VolTemplateProxy.size(self)


def _object_interface_init(stock: Any) -> Any:
    """``ObjectInterface.__init__`` building its vol already flattened (:func:`_new_vol`).

    Stock builds ``ChainMap({}, {type_name, offset}, object_info, kwargs)``;
    this builds the same :class:`VolChainMap` and, when ``object_info`` is a
    plain ``ObjectInformation`` (its fields and nothing else), its merged dict
    too (ChainMap's key order and first-map-wins values), which the first
    lookup would otherwise compute field by field.
    """
    def __init__(self: Any, context: Any, type_name: str, object_info: Any, **kwargs: Any) -> None:
        _new_vol(self, context, type_name, object_info, kwargs)

    __init__.__wrapped__ = stock  # type: ignore[attr-defined]
    return __init__


def _plan_of_clone(template: Any) -> Any:
    """The plan (see :func:`_plan`) that builds what a ``clone()`` of ``template``
    would build, or None where only stock's clone-and-call is known to be right.

    A clone keeps a template's constructor arguments and drops its
    ``update_vol`` additions, so the template's own plan serves only an
    ``ObjectTemplate`` with nothing added since it was built (its vol's first
    map empty), a class a maker builds, and a known size."""
    vol = template._vol
    if type(template) is not _ObjectTemplate or type(vol) is not VolChainMap or len(vol.maps) != 3 or vol.maps[0]:
        return None
    plan = vol._plan
    if plan is None:
        plan = _plan(template, vol)
    if not plan or plan[3] is _UNSIZED:
        return None
    return plan

def _context_object(stock: Any) -> Any:
    """``Context.object`` for a type name or an ``ObjectTemplate`` and no extra
    arguments, without cloning the template.

    Stock clones the type's template (``clone()``: a new template from the
    arguments it was constructed with), applies no ``update_vol`` and calls the
    clone. When the cached template has had nothing added since (its
    ``update_vol`` map is empty) and its class is one :func:`_maker` builds, the
    clone would hold exactly the template's own arguments, so the template
    itself builds the same object. Given a template (``Module.object_from_symbol``
    passes the symbol's: 12% of pscallstack in clones), stock also writes the
    template's vol into the clone with ``update_vol``: the same keys and values
    it already holds, so the same object again. Anything else (a reference
    template, extra arguments, enumerations, other classes) is stock's.
    """
    def object(self: Any, object_type: Any, layer_name: str, offset: int, native_layer_name: str | None = None,
               **arguments: Any) -> Any:
        if arguments:
            return stock(self, object_type, layer_name, offset, native_layer_name, **arguments)
        if type(object_type) is str:
            try:
                template = self._symbol_space.get_type(object_type)
            except Exception:  # noqa: BLE001 (stock looks for an enumeration, or raises its own error)
                return stock(self, object_type, layer_name, offset, native_layer_name)
        elif type(object_type) is _ObjectTemplate:
            template = object_type  # stock: a clone given the template's own vol again (update_vol)
        else:
            return stock(self, object_type, layer_name, offset, native_layer_name)
        plan = _plan_of_clone(template)
        if plan is None:
            return stock(self, object_type, layer_name, offset, native_layer_name)
        make, object_class, flat, size = plan
        return make(object_class, self, flat, layer_name, offset, native_layer_name or layer_name, None, None, size)

    object.__wrapped__ = stock  # type: ignore[attr-defined]
    return object


def _object_cast(stock: Any) -> Any:
    """``ObjectInterface.cast`` to a type name, without cloning the type's template.

    Stock clones the template (``clone()``, without ``update_vol`` additions),
    applies ``additional`` and calls the clone at the object's own place
    (layer, offset, member name, parent, native layer) with the clone's size.
    Without ``additional``, when the cached template has had nothing added
    (its first map is empty) and its class is one :func:`_maker` builds, the
    clone would hold exactly the template's own arguments: its plan builds the
    same object, as :func:`_context_object` does. proc.Maps casts for every
    maple-tree slot and path component (8% of its time in clones). Anything
    else is stock's, and so are its errors.
    """
    from volatility3.framework import constants

    def cast(self: Any, new_type_name: str, **additional: Any) -> Any:
        svol = self._vol
        if additional or type(svol) is not VolChainMap:
            return stock(self, new_type_name, **additional)
        name = new_type_name
        if constants.BANG not in name:
            name = self.get_symbol_table_name() + constants.BANG + name
        try:
            template = self._context.symbol_space.get_type(name)
        except Exception:  # noqa: BLE001 (stock raises its own error)
            return stock(self, new_type_name)
        plan = _plan_of_clone(template)
        if plan is None:
            return stock(self, new_type_name)
        make, object_class, flat, size = plan
        own = svol._flat or _flat_vol(svol)
        layer_name = own["layer_name"]
        return make(object_class, self._context, flat, layer_name, own["offset"],
                    own["native_layer_name"] or layer_name, own["member_name"], own["parent"], size)

    cast.__wrapped__ = stock  # type: ignore[attr-defined]
    return cast


def _pointer_dereference(stock: Any) -> Any:
    """``Pointer.dereference`` with its vol read once (same per-layer cache)."""
    def dereference(self: Any, layer_name: str | None = None) -> Any:
        vol = self._vol
        vol = vol._flat or _flat_vol(vol) if type(vol) is VolChainMap else vol
        if layer_name is None:
            layer_name = vol["native_layer_name"]
        cache = self._cache
        if cache.get(layer_name, None) is None:
            layer_name = layer_name or vol["native_layer_name"]
            subtype = _resolved(vol["subtype"])
            context = self._context
            offset = self & context.layers[layer_name].address_mask
            svol = subtype._vol
            plan = None
            if type(subtype) is _ObjectTemplate and type(svol) is VolChainMap:
                plan = svol._plan
                if plan is None:
                    plan = _plan(subtype, svol)
            if plan and plan[3] is not _UNSIZED:
                cache[layer_name] = plan[0](plan[1], context, plan[2], layer_name, offset, layer_name, None, self,
                                            plan[3])
            else:
                cache[layer_name] = subtype(context=context, object_info=_ObjectInformation(
                    layer_name=layer_name, offset=offset, parent=self, size=subtype.size,
                    native_layer_name=layer_name))
        return cache[layer_name]

    dereference.__wrapped__ = stock  # type: ignore[attr-defined]
    return dereference


def _resolved(template: Any) -> Any:
    """``template``, or the template a deferred one stands for (an object with a
    ``_resolve()`` that forwards every use to the real template, as
    ``volbridge.DeferredTemplate`` does for pointer subtypes): the same object
    is built either way, but the real one has a plan and a cached size."""
    if type(template) is _ObjectTemplate:
        return template
    resolve = getattr(type(template), "_resolve", None)
    return resolve(template) if resolve is not None else template


def _pointer_is_readable(stock: Any) -> Any:
    """``Pointer.is_readable`` with its vol read once."""
    def is_readable(self: Any, layer_name: str | None = None) -> bool:
        vol = self._vol
        vol = vol._flat or _flat_vol(vol) if type(vol) is VolChainMap else vol
        layer_name = layer_name or vol["native_layer_name"]
        subtype = _resolved(vol["subtype"])
        svol = subtype._vol
        size = svol._size if type(svol) is VolChainMap else None  # _template_size's cache, read in place
        return self._context.layers[layer_name].is_valid(self, subtype.size if size is None else size)

    is_readable.__wrapped__ = stock  # type: ignore[attr-defined]
    return is_readable


def _aggregate_has_member(stock: Any) -> Any:
    """``AggregateType.has_member`` without building a ReadOnlyMapping."""
    def has_member(self: Any, member_name: str) -> bool:
        vol = self._vol
        vol = vol._flat or _flat_vol(vol) if type(vol) is VolChainMap else vol
        return member_name in vol["members"]

    has_member.__wrapped__ = stock  # type: ignore[attr-defined]
    return has_member


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
_ObjectTemplate = templates.ObjectTemplate
_OBJECT_INFORMATION_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(_ObjectInformation))
_OBJECT_INFORMATION_FIELDS = frozenset(_OBJECT_INFORMATION_FIELD_ORDER)
#: :func:`_new_vol` writes these fields out, in this order (another volatility3: the generic path).
_FIELDS_AS_WRITTEN = _OBJECT_INFORMATION_FIELD_ORDER == (
    "layer_name", "offset", "native_layer_name", "member_name", "parent", "size")
_new_object = object.__new__


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

    _flat: dict | None = None  # the merged dict, once made
    _sealed = True  # False: look up map by map
    _size: int | None = None  # a template's size (see _template_size), until the next write
    _plan: Any = None  # a template's plan (see _plan), until the next write
    _parts: tuple | None = None  # what ``maps`` is built from, for an object a maker built (see _born)
    _view: Any = None  # the ReadOnlyMapping ``vol`` returns (see view)

    def __getattr__(self, name: str) -> Any:
        # Only reached for ``maps`` of a map born flat (see _born): built on first use.
        parts = self._parts
        if name != "maps" or parts is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        maps = self.maps = _maps_of_parts(parts)
        self._parts = None
        return maps

    def __init__(self, *maps: Any) -> None:
        self.maps = list(maps) or [{}]
        self._flat = None
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

    def view(self) -> Any:
        """The ``ReadOnlyMapping`` an object's or template's ``vol`` returns, made once:
        a :class:`_FlatVolView` over the flat dict (its keys read as attributes
        without a call) when this map is sealed and no key is a name of the
        view's class; else stock's own, which reads this map on every use."""
        view = self._view
        if view is None:
            flat = self.flat()
            if flat is None or not _VIEW_NAMES.isdisjoint(flat):
                view = _ReadOnlyMapping(self)
            else:
                view = _new_object(_FlatVolView)
                view._chain = self
                view.__dict__ = flat
            self._view = view
        return view

    def _forget_flat(self) -> None:
        """The flat dict is no longer this map's: a view over it reads the map from now on."""
        view = self._view
        if view is not None:
            if type(view) is _FlatVolView:
                view.__dict__ = {}
            self._view = None
        self._flat = self._size = self._plan = None

    # Writes go to maps[0], as ChainMap's; the flat dict follows them.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.maps[0][key] = value
        self._size = self._plan = None
        if self._flat is not None:
            if key in _VIEW_NAMES and self._view is not None:
                self._forget_flat()  # a key its view's class has as a name: stock's view reads it
                return
            self._flat[key] = value

    def __delitem__(self, key: Any) -> None:
        self._forget_flat()
        super().__delitem__(key)

    def popitem(self) -> Any:
        self._forget_flat()
        return super().popitem()

    def pop(self, key: Any, *args: Any) -> Any:
        self._forget_flat()
        return super().pop(key, *args)

    def clear(self) -> None:
        self._forget_flat()
        super().clear()

    def __ior__(self, other: Any) -> "VolChainMap":
        self._forget_flat()
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


_ReadOnlyMapping = interfaces.objects.ReadOnlyMapping


class _FlatVolView(_ReadOnlyMapping):
    """Stock's ``ReadOnlyMapping`` over a sealed :class:`VolChainMap`, whose instance
    ``__dict__`` is the map's flat dict: ``obj.vol.offset`` is one dict lookup,
    not a ``__getattr__`` call. ``_dict`` is the map itself, as stock's; a key
    not there reaches ``__getattr__``, which reads the map (stock's error for
    an unknown one). The map empties this ``__dict__`` when its flat dict is
    dropped, so a view kept across such a write reads the map, as stock's does."""

    __slots__ = ("_chain",)  # and the __dict__ it inherits

    @property
    def _dict(self) -> Any:
        return self._chain


_FlatVolView.__name__ = _FlatVolView.__qualname__ = "ReadOnlyMapping"  # stock's errors name the class

#: names a flat view's attribute lookup finds on its class, before its ``__dict__``:
#: a vol with such a key gets stock's view
_VIEW_NAMES = frozenset(dir(_FlatVolView))


def _vol_property(stock: property) -> property:
    """``ObjectInterface.vol`` / ``Template.vol``: stock's ReadOnlyMapping over
    ``self._vol``, made once per map (:meth:`VolChainMap.view`)."""
    def vol(self: Any) -> Any:
        chain = self._vol
        if type(chain) is VolChainMap:
            view = chain._view
            return view if view is not None else chain.view()
        return _ReadOnlyMapping(chain)

    vol.__wrapped__ = stock.fget  # type: ignore[attr-defined]
    return property(vol, doc=stock.__doc__)


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
    from volatility3.framework import contexts, objects
    from volatility3.framework.interfaces import objects as iobjects
    from volatility3.framework.objects import AggregateType, templates

    if getattr(AggregateType.__getattr__, "__wrapped__", None) is not None:
        return  # already adapted in this process
    iobjects.ObjectInformation.__contains__ = _object_information_contains(  # type: ignore[method-assign]
        iobjects.ObjectInformation)
    iobjects.ReadOnlyMapping.__getattr__ = _read_only_mapping_getattr  # type: ignore[method-assign]
    AggregateType.__getattr__ = _aggregate_getattr(AggregateType.__getattr__)  # type: ignore[method-assign]
    AggregateType.__dir__ = _aggregate_dir(AggregateType.__dir__)  # type: ignore[method-assign]
    for cls in (iobjects.ObjectInterface, iobjects.Template):
        cls.vol = _vol_property(cls.vol)  # type: ignore[method-assign,assignment]
    templates.ObjectTemplate.__call__ = _template_call  # type: ignore[method-assign]
    templates.ObjectTemplate.size = property(_template_size)  # type: ignore[method-assign,assignment]
    iobjects.ObjectInterface.__init__ = _object_interface_init(  # type: ignore[method-assign]
        iobjects.ObjectInterface.__init__)
    objects.Pointer.dereference = _pointer_dereference(objects.Pointer.dereference)  # type: ignore[method-assign]
    objects.Pointer.is_readable = _pointer_is_readable(objects.Pointer.is_readable)  # type: ignore[method-assign]
    AggregateType.has_member = _aggregate_has_member(AggregateType.has_member)  # type: ignore[method-assign]
    contexts.Context.object = _context_object(contexts.Context.object)  # type: ignore[method-assign]
    iobjects.ObjectInterface.cast = _object_cast(iobjects.ObjectInterface.cast)  # type: ignore[method-assign]
    from volatility3.framework.symbols.linux.extensions import task_struct

    task_struct._get_boottime_raw = _epoch_cached_boottime(  # type: ignore[method-assign]
        task_struct._get_boottime_raw)
    if not isinstance(getattr(iobjects, "collections", None), _CollectionsWithVolChainMap):
        iobjects.collections = _CollectionsWithVolChainMap()  # type: ignore[assignment]
