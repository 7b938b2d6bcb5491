"""Fast literal scans give exactly what volatility3's stock scanners give.

``LivePhysicalLayer.scan`` answers stock ``BytesScanner`` and
``MultiStringScanner`` with :func:`shadowvol.volbridge.find_literals` (in-place
``find`` on guest RAM). These property tests compare the two on haystacks
built from the needles themselves (adjacent, overlapping, prefix-sharing,
straddling segment boundaries), with the stock scanner as the reference.
"""

from __future__ import annotations

from hypothesis import example, given, settings, strategies as st
from volatility3.framework.layers import scanners

from shadowvol.backends.base import BufferMemory, PhysicalMemory, Segment
from shadowvol.volbridge import _anchor, find_literals, literal_needles


def _stock(needles: list[bytes], data: bytes) -> list[tuple[int, bytes]]:
    scanner = scanners.MultiStringScanner(needles)
    scanner.chunk_size = len(data) + 1  # one chunk: the reference semantics, no overlap effects
    return list(scanner(data, 0))


class _Copying(PhysicalMemory):
    """The generic (read-and-copy) find path of PhysicalMemory over a bytes buffer."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, paddr: int, length: int) -> bytes:
        return self._data[paddr:paddr + length]

    def ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self._data))]

    def metadata(self) -> dict:
        return {}


pointer_like = st.lists(st.binary(min_size=1, max_size=3), min_size=1, max_size=6).map(
    lambda lows: [low.ljust(3, b"\0") + b"\xab\xff\xff\xff\xff" for low in lows])
free_form = st.lists(st.binary(min_size=1, max_size=6), min_size=1, max_size=5)


@st.composite
def haystack(draw, needles_strategy):
    needles = draw(needles_strategy)
    parts = draw(st.lists(st.one_of(st.sampled_from(needles), st.binary(max_size=9)), max_size=40))
    return needles, b"".join(parts)


@settings(max_examples=400, deadline=None)
@given(st.one_of(haystack(pointer_like), haystack(free_form)))
@example(([b"\0\0", b"\0\0"], b"\0\0\0\0"))  # one distinct needle: still never overlapping (0, 2)
def test_find_literals_equals_multistringscanner(case):
    needles, data = case
    if not data:
        return
    want = _stock(needles, data)
    mem = BufferMemory(data, [Segment(0, len(data), 0)])
    assert list(find_literals(mem, 0, len(data), list(dict.fromkeys(needles)))) == want
    assert list(find_literals(_Copying(data), 0, len(data), list(dict.fromkeys(needles)))) == want


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=3), st.lists(st.sampled_from([b"\0", b"\0\0", b"a", b"aa", b"xyz"]), max_size=30))
@example(b"\0\0", [b"\0\0", b"\0\0"])
def test_find_literals_overlapping_equals_bytesscanner(needle, parts):
    """BytesScanner reports every occurrence, overlapping ones included (``find(needle, pos + 1)``)."""
    data = b"".join(parts)
    if not data:
        return
    scanner = scanners.BytesScanner(needle)
    scanner.chunk_size = len(data) + 1
    want = list(scanner(data, 0))
    got = [a for a, _ in find_literals(BufferMemory(data, [Segment(0, len(data), 0)]), 0, len(data), [needle],
                                       overlapping=True)]
    assert got == want


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=5), st.binary(max_size=300), st.integers(1, 299))
def test_buffer_find_across_adjacent_segments(needle, noise, cut):
    """A match straddling two physically adjacent segments stored apart is found once."""
    data = noise[:cut] + needle + noise[cut:]
    split = min(len(data) - 1, cut + len(needle) // 2) if len(data) > 1 else 0
    # Store the second half first in the buffer: adjacent in physical space, apart in the buffer.
    buf = data[split:] + data[:split]
    mem = BufferMemory(buf, [Segment(0, split, len(data) - split), Segment(split, len(data), 0)])
    want = [i for i in range(len(data)) if data.startswith(needle, i)]
    assert list(mem.find(needle)) == want


def test_needles_recovered_from_stock_scanners():
    ms = scanners.MultiStringScanner([b"abc", b"abd", b"x"])
    assert sorted(literal_needles(ms)) == [b"abc", b"abd", b"x"]
    assert literal_needles(scanners.BytesScanner(b"VMCOREINFO")) == [b"VMCOREINFO"]
    assert literal_needles(scanners.RegExScanner(b"a.c")) is None

    class Filtering(scanners.MultiStringScanner):  # a subclass may filter: stock path
        pass

    assert literal_needles(Filtering([b"abc"])) is None


def test_anchor_is_the_shared_high_bytes_of_pointers():
    needles = [b"\x40\x61\x6b\xab\xff\xff\xff\xff", b"\x00\x62\x6b\xab\xff\xff\xff\xff"]
    assert _anchor(needles) == (2, b"\x6b\xab\xff\xff\xff\xff")
    assert _anchor([b"abc", b"xyz"])[1] == b""
