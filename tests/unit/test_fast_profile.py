"""The fast profile format (``save_fast``/``load_fast``): what it loads is the ISF it
was given, and a damaged file gives a ProfileError or a miss, never a crash or a hang."""

from __future__ import annotations

import marshal
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowvol.errors import ProfileError
from shadowvol.symbols import FAST_MAGIC, SymbolIndex, load_fast, save_fast, symbols_by_address

_name = st.text(min_size=0, max_size=24)
_entry = st.fixed_dictionaries({"address": st.integers(0, (1 << 64) - 1)},
                               optional={"type": st.fixed_dictionaries({"kind": st.just("base"),
                                                                        "name": st.sampled_from(["int", "long"])}),
                                         "constant_data": st.text(max_size=8)})


def _isf(symbols: dict) -> dict:
    return {"metadata": {"format": "6.2.0"}, "base_types": {"int": {"kind": "int", "size": 4}},
            "user_types": {"task_struct": {"kind": "struct", "size": 8, "fields": {}}},
            "enums": {"e": {"size": 4, "base": "int", "constants": {"A": 1}}},
            "symbols": symbols}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(symbols=st.dictionaries(_name, _entry, max_size=300), absent=st.lists(_name, max_size=20),
       mapped=st.booleans())
def test_fast_copy_is_the_isf(symbols: dict, absent: list, mapped: bool, tmp_path) -> None:
    """Every section, every symbol (in the ISF's order), every miss and the stored
    by-address index are what the ISF holds, whether the file is read or mapped."""
    isf = _isf(symbols)
    path = save_fast(isf, tmp_path / "p.svisf")
    fast = load_fast(path, mapped=mapped)
    index = fast["symbols"]
    assert isinstance(index, SymbolIndex) and len(index) == len(symbols)
    assert list(index) == list(symbols)
    for name in absent:
        assert (name in index) == (name in symbols)
        assert index.get(name, "miss") == symbols.get(name, "miss")
    for name, entry in symbols.items():
        assert name in index and index[name] == entry and index.get(name) is index[name]
    assert index.by_address is not None and marshal.loads(index.by_address) == symbols_by_address(symbols)
    assert {k: fast[k] for k in ("metadata", "base_types")} == {k: isf[k] for k in ("metadata", "base_types")}
    assert fast["user_types"]["task_struct"] == isf["user_types"]["task_struct"]
    assert dict(fast["enums"].items()) == isf["enums"]
    plain = load_fast(path, lazy=False)
    assert plain == isf and list(plain["symbols"]) == list(symbols)


def test_lookups_decode_only_what_they_ask(tmp_path) -> None:
    symbols = {f"sym{i}": {"address": 0xFFFFFFFF81000000 + i} for i in range(5000)}
    fast = load_fast(save_fast(_isf(symbols), tmp_path / "p.svisf"), mapped=True)
    assert fast["symbols"]["sym4321"] == {"address": 0xFFFFFFFF81000000 + 4321}
    assert "sym5000" not in fast["symbols"] and "sym0" in fast["symbols"]
    assert list(fast["symbols"]._decoded) == ["sym4321"]
    assert [a for a, _ in symbols_by_address(fast["symbols"], 0xFFFF)] == sorted(i for i in range(5000))
    assert list(fast["symbols"]._decoded) == ["sym4321"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_file_is_a_profile_error(data, tmp_path) -> None:
    """Bytes flipped anywhere, or the file cut short: loading and every lookup either
    answer or raise ProfileError (or KeyError for a miss); nothing else, no hang."""
    symbols = {f"sym_{i}": {"address": i * 16} for i in range(64)}
    raw = bytearray((save_fast(_isf(symbols), tmp_path / "good.svisf")).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(len(FAST_MAGIC), len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(FAST_MAGIC), len(raw)))
    bad = tmp_path / "bad.svisf"
    bad.write_bytes(bytes(raw[:cut]))
    try:
        fast = load_fast(bad, mapped=data.draw(st.booleans()))
        index = fast["symbols"]
        for name in [*symbols, "absent", ""]:
            try:
                index.get(name)
                _ = name in index
            except ProfileError:
                pass
        try:
            list(index)
        except ProfileError:
            pass
    except ProfileError:
        pass


def test_not_a_fast_file(tmp_path) -> None:
    bad = tmp_path / "x.svisf"
    bad.write_bytes(b"{}")
    with pytest.raises(ProfileError, match="not a shadowvol fast profile"):
        load_fast(bad)
    bad.write_bytes(b"")
    with pytest.raises(ProfileError):
        load_fast(bad, mapped=True)


def test_profile_cache_keeps_the_most_recently_used_copies(tmp_path, monkeypatch) -> None:
    """load_profile's fast copies are a bounded cache: a load marks its copy used, and
    a new copy removes all but FAST_COPIES_KEPT, the most recently used first."""
    import json

    from shadowvol import profiles

    monkeypatch.setenv("SHADOWVOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(profiles, "FAST_COPIES_KEPT", 4)
    paths = []
    for i in range(7):
        p = tmp_path / f"p{i}.json"
        p.write_text(json.dumps(_isf({"init_task": {"address": 0x1000 + i}})))
        paths.append(p)
    cache = tmp_path / "cache" / "profile-cache"

    def load(i: int) -> None:
        assert profiles.load_profile(paths[i])["symbols"]["init_task"] == {"address": 0x1000 + i}

    for i in range(4):
        load(i)
    (cache / "0123456789abcdef0123.marshal").write_bytes(b"SVISF1\n older format")
    os.utime(cache / "0123456789abcdef0123.marshal", (4, 4))
    os.utime(profiles._fast_path(paths[1]), (2, 2))  # p1's copy was used long ago, p0's too
    os.utime(profiles._fast_path(paths[0]), (3, 3))
    load(0)  # a copy found is marked used (and not rebuilt)
    kept = {q.name for q in cache.glob("*.marshal")}
    assert len(kept) == 5
    load(4)  # a new copy: the two least recently used go (p1's, the old format)
    names = {q.name for q in cache.glob("*.marshal")}
    assert names == {profiles._fast_path(paths[i]).name for i in (0, 2, 3, 4)}
    for i in (5, 6, 1):
        load(i)
    assert len(list(cache.glob("*.marshal"))) == 4 and profiles._fast_path(paths[1]).exists()


def test_a_file_that_cannot_be_mapped_is_read(tmp_path, monkeypatch) -> None:
    import mmap

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    path = save_fast(_isf({"init_task": {"address": 16}}), tmp_path / "p.svisf")
    monkeypatch.setattr(mmap, "mmap", refuse)
    assert load_fast(path, mapped=True)["symbols"]["init_task"] == {"address": 16}


def test_a_fast_file_given_as_the_profile_loads(tmp_path, monkeypatch) -> None:
    """``--profile`` may name a fast file (read_profile reads both formats): it is
    checked as an ISF and gets its own cached copy, like a JSON profile."""
    from shadowvol import profiles
    from shadowvol.symbols import read_profile

    monkeypatch.setenv("SHADOWVOL_CACHE", str(tmp_path / "cache"))
    symbols = {"init_task": {"address": 0x1000}, "linux_banner": {"address": 0x2000}}
    path = save_fast(_isf(symbols), tmp_path / "given.svisf")
    assert read_profile(path)["symbols"]["init_task"] == {"address": 0x1000}
    isf = profiles.load_profile(path)
    assert dict(isf["symbols"].items()) == symbols and profiles._fast_path(path).exists()
    bad = _isf({"init_task": {"address": "not an int"}})
    with pytest.raises(ProfileError, match="no integer address"):
        profiles.load_profile(save_fast(bad, tmp_path / "bad.svisf"))
