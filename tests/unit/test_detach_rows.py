"""volbridge.detach_rows: a TreeGrid's rows keep plain values, never the plugin's objects.

Stock plugins yield objects as cells (``task.pid``); each such cell held its
parent and, through it, every member object made from it, for as long as the
grid keeps the row (issue 12: 540 MB for proc.Maps at 2,000 tasks). These
tests build real volatility3 objects on a synthetic layer and render the same
rows through every stock text renderer, with and without detaching.
"""

from __future__ import annotations

import contextlib
import gc
import io
import weakref

import pytest
from volatility3.cli import text_renderer
from volatility3.framework import contexts, interfaces, objects, renderers
from volatility3.framework.layers.physical import BufferDataLayer
from volatility3.framework.objects import templates
from volatility3.framework.renderers import format_hints

from shadowvol import volbridge

DATA = bytes(range(1, 65)) + b"sshd\x00\x00\x00\x00"


def _struct_template():
    u32 = templates.ObjectTemplate(objects.Integer, "u32", data_format=objects.DataFormatInfo(4, "little", False))
    s32 = templates.ObjectTemplate(objects.Integer, "s32", data_format=objects.DataFormatInfo(4, "little", True))
    ptr = templates.ObjectTemplate(objects.Pointer, "pointer", data_format=objects.DataFormatInfo(8, "little", False),
                                   subtype=u32)
    flag = templates.ObjectTemplate(objects.Boolean, "bool", data_format=objects.DataFormatInfo(1, "little", False))
    state = templates.ObjectTemplate(objects.Enumeration, "state", base_type=u32, choices={"A": 0x0c0b0a09})
    name = templates.ObjectTemplate(objects.String, "string", max_length=8, encoding="utf-8")
    raw = templates.ObjectTemplate(objects.Bytes, "bytes", length=4)
    return templates.ObjectTemplate(objects.StructType, "task", size=72, members={
        "pid": (0, u32), "delta": (4, s32), "ptr": (8, ptr), "flag": (16, flag), "state": (8, state),
        "name": (64, name), "raw": (20, raw)})


COLUMNS = [("PID", int), ("DELTA", int), ("PTR", format_hints.Hex), ("FLAG", int), ("STATE", int),
           ("NAME", str), ("RAW", bytes), ("WHERE", format_hints.Hex), ("NOTE", str)]


def _grid(made: list, detach: bool, typed_column: bool = False) -> renderers.TreeGrid:
    """Three rows of cells read from a fresh struct each; ``made`` receives weak references to the structs."""
    ctx = contexts.Context()
    ctx.layers.add_layer(BufferDataLayer(ctx, "cfg", "mem", DATA))
    struct_t = _struct_template()

    def rows():
        for i in range(3):
            task = struct_t(ctx, interfaces.objects.ObjectInformation(layer_name="mem", offset=0,
                                                                       native_layer_name="mem"))
            made.append(weakref.ref(task))
            yield i % 2, [task.pid, task.delta, format_hints.Hex(task.ptr), task.flag, task.state, task.name,
                          task.raw, format_hints.Hex(task.vol.offset),
                          renderers.UnreadableValue() if i == 2 else "plain"] + ([task.pid] if typed_column else [])

    grid = renderers.TreeGrid(COLUMNS + ([("OBJ", objects.Integer)] if typed_column else []), rows())
    if detach:
        volbridge.detach_rows(grid)
    return grid


def _rendered(renderer_cls: type, detach: bool) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        renderer_cls().render(_grid([], detach))
    return out.getvalue()


@pytest.mark.parametrize("renderer", ["QuickTextRenderer", "PrettyTextRenderer", "CSVRenderer", "JsonRenderer",
                                      "JsonLinesRenderer"])
def test_every_stock_renderer_prints_the_same(renderer):
    cls = getattr(text_renderer, renderer)
    plain, stock = _rendered(cls, True), _rendered(cls, False)
    assert plain == stock
    assert "sshd" in plain and str(0x0c0b0a09) in plain  # the rows were rendered


def test_cells_are_plain_values_equal_to_the_objects():
    values = {True: [], False: []}
    for detach in values:
        _grid([], detach).populate(lambda node, acc: acc.append(list(node.values)) or acc, values[detach])
    for plain_row, stock_row in zip(values[True], values[False]):
        same = [type(v) if isinstance(v, renderers.UnreadableValue) else v for v in plain_row]
        assert same == [type(v) if isinstance(v, renderers.UnreadableValue) else v for v in stock_row]
        for (name, _), plain, stock in zip(COLUMNS, plain_row, stock_row):
            assert not isinstance(plain, interfaces.objects.ObjectInterface), name
            if isinstance(stock, interfaces.objects.ObjectInterface):
                assert type(plain) in volbridge.PLAIN_TYPES and hash(plain) == hash(stock), name
    assert sum(isinstance(v, interfaces.objects.ObjectInterface) for v in values[False][0]) == 5  # Integer x2, Boolean, Enumeration, Bytes
    assert type(values[True][0][3]) is int and values[True][0][3] == values[False][0][3]  # a Boolean: 0 or 1


def test_a_column_typed_as_the_object_keeps_it():
    rows: list = []
    _grid([], True, typed_column=True).populate(lambda node, acc: acc.append(node.values) or acc, rows)
    assert all(type(row[-1]) is objects.Integer and type(row[0]) is int for row in rows)


def test_the_grid_no_longer_keeps_each_rows_objects_alive():
    for detach, alive in ((True, 0), (False, 3)):
        made: list = []
        grid = _grid(made, detach)
        grid.populate()
        gc.collect()
        assert len(made) == 3 and sum(ref() is not None for ref in made) == alive, detach
        assert grid.row_count == 3


def test_rows_of_another_length_meet_the_grids_own_check():
    ctx = contexts.Context()
    ctx.layers.add_layer(BufferDataLayer(ctx, "cfg", "mem", DATA))
    task = _struct_template()(ctx, interfaces.objects.ObjectInformation(layer_name="mem", offset=0,
                                                                         native_layer_name="mem"))
    grid = renderers.TreeGrid([("PID", int)], iter([(0, [task.pid, task.delta])]))
    volbridge.detach_rows(grid)
    with pytest.raises(TypeError, match="number the same as the columns"):
        grid.populate()


def test_a_populated_grid_is_left_as_it_is():
    grid = _grid([], False)
    grid.populate()
    generator = grid._generator
    volbridge.detach_rows(grid)
    assert grid._generator is generator


class _Signed(objects.Integer):
    """An extension class that renders itself otherwise than its int value."""

    def __str__(self) -> str:
        return f"{int(self):+d}"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


@pytest.mark.parametrize("renderer", ["QuickTextRenderer", "CSVRenderer"])
def test_a_class_that_converts_itself_otherwise_is_kept(renderer):
    ctx = contexts.Context()
    ctx.layers.add_layer(BufferDataLayer(ctx, "cfg", "mem", DATA))
    signed = templates.ObjectTemplate(_Signed, "signed", data_format=objects.DataFormatInfo(4, "little", False))

    def grid(detach: bool) -> renderers.TreeGrid:
        cell = signed(ctx, interfaces.objects.ObjectInformation(layer_name="mem", offset=0, native_layer_name="mem"))
        g = renderers.TreeGrid([("VALUE", int)], iter([(0, [cell])]))
        if detach:
            volbridge.detach_rows(g)
        return g

    outputs = []
    for detach in (True, False):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            getattr(text_renderer, renderer)().render(grid(detach))
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] and f"+{0x04030201}" in outputs[0]
    rows: list = []
    grid(True).populate(lambda node, acc: acc.append(node.values) or acc, rows)
    assert type(rows[0][0]) is _Signed
