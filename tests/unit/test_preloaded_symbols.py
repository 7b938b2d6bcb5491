"""PreloadedISF's plain-symbol path gives what stock Version5+ ``get_symbol`` gives."""

from __future__ import annotations

import base64

import pytest
from volatility3.framework import contexts, exceptions
from volatility3.framework.symbols import intermed

from shadowvol.volbridge import PreloadedISF

MASK = (1 << 48) - 1


def _isf() -> dict:
    return {
        "metadata": {"format": "6.2.0", "producer": {"name": "test", "version": "0"}},
        "base_types": {"pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
                       "int": {"kind": "int", "size": 4, "signed": True, "endian": "little"}},
        "user_types": {}, "enums": {},
        "symbols": {
            "plain": {"address": 0xFFFFFFFF81234560},
            "typed": {"address": 0xFFFFFFFF82000000, "type": {"kind": "base", "name": "int"}},
            "banner": {"address": 0xFFFFFFFF82100000, "constant_data": base64.b64encode(b"Linux").decode()},
            "zero": {"address": 0},
        },
    }


def _tables(mask: int):
    ctx = contexts.Context()
    ctx.config["t.symbol_mask"] = mask
    ours = PreloadedISF(ctx, "t", "ours", "file:///t", isf=_isf(), symbol_mask=mask)
    stock_ctx = contexts.Context()
    stock_ctx.config["s.symbol_mask"] = mask
    stock = intermed.Version6Format(stock_ctx, "s", "stock", _isf())
    return ours, stock


@pytest.mark.parametrize("mask", [0, MASK])
def test_every_symbol_is_what_stock_gives(mask: int) -> None:
    ours, stock = _tables(mask)
    assert "get_symbol" in vars(ours._delegate)  # the fast path is installed
    for name in ("plain", "typed", "banner", "zero", "plain"):
        a, b = ours.get_symbol(name), stock.get_symbol(name)
        assert (a.name, a.address, a.constant_data) == (b.name, b.address, b.constant_data)
        assert (a.type is None) == (b.type is None)
        assert ours.get_symbol(name) is a  # cached, as stock caches
    assert ours.get_symbol("plain").address == (0xFFFFFFFF81234560 & mask if mask else 0xFFFFFFFF81234560)
    with pytest.raises(exceptions.SymbolError):
        ours.get_symbol("missing")
    assert sorted(ours.get_symbols_by_location(ours.get_symbol("plain").address)) == ["plain"]


@pytest.mark.parametrize("mask", [0, MASK])
def test_symbols_by_location_is_what_stock_gives(mask: int, tmp_path, monkeypatch) -> None:
    """Our by-address index (built from the ISF's entries, or stored in the fast copy)
    answers get_symbols_by_location as stock's own index (82k get_symbol calls) does."""
    from shadowvol.symbols import SymbolIndex, load_fast, save_fast, symbols_by_address

    ours, stock = _tables(mask)
    stock_index = sorted((stock.get_symbol(n).address, n) for n in stock.symbols)
    assert ours.symbols_by_address() == stock_index
    for name in ("plain", "typed", "banner", "zero"):
        at = stock.get_symbol(name).address
        assert list(ours.get_symbols_by_location(at, 0x10)) == \
            [n for a, n in stock_index if at <= a <= at + 0x10]
    save_fast(_isf(), tmp_path / "p.marshal")
    fast = load_fast(tmp_path / "p.marshal")
    assert isinstance(fast["symbols"].by_address, bytes) and set(fast) == set(_isf())
    assert symbols_by_address(fast["symbols"], mask) == stock_index
    assert not fast["symbols"]._decoded  # the stored index decoded no entry
    monkeypatch.setattr(SymbolIndex, "by_address", property(lambda self: b"damaged"))
    assert symbols_by_address(fast["symbols"], mask) == stock_index
