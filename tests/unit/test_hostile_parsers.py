"""Parsers of hostile input raise only shadowvol's own errors (issue 9).

Property tests (hypothesis) per parser family, the probes of issue 9 as
regressions, and a short slice of tests/fuzz/fuzz_parsers.py.
"""

from __future__ import annotations

import json
import lzma
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowvol.errors import ProfileError, ShadowvolError, VMError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzz_parsers as fz  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def btf_blob(types: bytes, strings: bytes = b"\0") -> bytes:
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def rec(name_off: int, kind: int, vlen: int, size_type: int, extra: bytes = b"") -> bytes:
    return struct.pack("<III", name_off, (kind << 24) | vlen, size_type) + extra


# -- BTF ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [2, 8, 9, 10, 11, 18])  # PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
def test_btf_type_pointing_at_itself(kind: int) -> None:
    from shadowvol.symbols.btf import parse_btf

    with pytest.raises(ProfileError, match="itself"):
        parse_btf(btf_blob(rec(0, kind, 0, 1)))


def test_btf_array_of_itself_and_two_cycle() -> None:
    from shadowvol.symbols.btf import parse_btf

    with pytest.raises(ProfileError, match="itself"):
        parse_btf(btf_blob(rec(0, 3, 0, 0, struct.pack("<III", 1, 1, 4))))
    with pytest.raises(ProfileError, match="itself"):
        parse_btf(btf_blob(rec(0, 8, 0, 2) + rec(0, 10, 0, 1)))


def test_btf_anonymous_struct_containing_itself() -> None:
    from shadowvol.symbols.btf import parse_btf

    # struct { typeof(self) *p; }: legal in BTF bytes, impossible in C.
    types = rec(0, 4, 1, 8, struct.pack("<III", 0, 2, 0)) + rec(0, 2, 0, 1)
    with pytest.raises(ProfileError, match="contains itself"):
        parse_btf(btf_blob(types))


def test_btf_named_list_head_is_fine() -> None:
    from shadowvol.symbols.btf import parse_btf

    types = rec(1, 4, 1, 8, struct.pack("<III", 0, 2, 0)) + rec(0, 2, 0, 1)
    g = parse_btf(btf_blob(types, b"\0list_head\0"))
    assert g.describe(2) == "struct list_head *"
    assert g.sizeof(1) == 8


def test_btf_name_offset_past_strings() -> None:
    from shadowvol.symbols.btf import parse_btf

    with pytest.raises(ProfileError, match="past the string section"):
        parse_btf(btf_blob(rec(0x1000, 1, 0, 4, struct.pack("<I", 32))))
    # a member name past the strings, as in issue 9
    types = rec(0, 1, 0, 4, struct.pack("<I", 32)) + rec(0, 4, 1, 4, struct.pack("<III", 999, 1, 0))
    with pytest.raises(ProfileError):
        parse_btf(btf_blob(types))


def test_btf_reference_past_last_type_and_deep_chains() -> None:
    from shadowvol.symbols.btf import parse_btf

    with pytest.raises(ProfileError, match="past the last"):
        parse_btf(btf_blob(rec(0, 2, 0, 77)))
    chain = rec(0, 1, 0, 4, struct.pack("<I", 32)) + b"".join(rec(0, 10, 0, i) for i in range(1, 5000))
    with pytest.raises(ProfileError, match="deep"):
        parse_btf(btf_blob(chain))


_record = st.tuples(st.integers(0, 40), st.integers(0, 20), st.integers(0, 3), st.integers(0, 12),
                    st.lists(st.integers(0, 12), max_size=9))


@FAST
@given(st.lists(_record, max_size=12), st.binary(max_size=40))
def test_btf_random_records_only_profile_errors(records: list, strings: bytes) -> None:
    """Random (but word-aligned) type records: parse_btf and the ISF writer
    either succeed or raise ProfileError."""
    from shadowvol.symbols.btf import parse_btf
    from shadowvol.symbols.isf import build_isf

    types = b"".join(rec(n, k, v, t, b"".join(struct.pack("<I", w) for w in extra))
                     for n, k, v, t, extra in records)
    try:
        g = parse_btf(btf_blob(types, b"\0" + strings))
    except ProfileError:
        return
    for tid in range(len(g)):
        g.sizeof(tid)
        g.describe(tid)
    build_isf(g, {}, producer_version="test", linux_metadata={})


@FAST
@given(st.binary(max_size=400))
def test_btf_arbitrary_bytes(data: bytes) -> None:
    from shadowvol.symbols.btf import find_btf, parse_btf

    find_btf(data)
    for blob in (data, struct.pack("<HBB", 0xEB9F, 1, 0) + data):
        try:
            parse_btf(blob)
        except ProfileError:
            pass


# -- kallsyms, vmlinuz ----------------------------------------------------------

@FAST
@given(st.binary(max_size=3000), st.integers(0, 7))
def test_kallsyms_arbitrary_bytes(data: bytes, misalign: int) -> None:
    from shadowvol.symbols.kallsyms import find_kallsyms, parse_system_map

    digits = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
    for buf in (data, data + digits + data, data[: len(data) // 2] + digits * 30):
        try:
            find_kallsyms(buf, 0xFFFFFFFF82000000 + misalign)
        except ProfileError:
            pass
    try:
        parse_system_map(data)
    except ProfileError:
        pass


def test_system_map_not_utf8() -> None:
    from shadowvol.symbols.kallsyms import parse_system_map

    syms = parse_system_map(b"ffffffff81000000 T _te\xffxt\nffffffff81000010 t x\n")
    assert syms[0].address == 0xFFFFFFFF81000000


@FAST
@given(st.integers(1, 4000), st.binary(max_size=8))
def test_truncated_vmlinux_elf(cut: int, junk: bytes) -> None:
    from shadowvol.symbols import _Image
    from shadowvol.symbols.vmlinuz import extract_vmlinux

    elf = fz.vmlinux_seed()
    for data in (elf[:cut], elf[:cut] + junk + elf[cut + len(junk):]):
        try:
            image = _Image(extract_vmlinux(data))
            image.section(".BTF")
        except ProfileError:
            pass


def test_decompression_bomb_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    from shadowvol.symbols import vmlinuz

    monkeypatch.setattr(vmlinuz, "MAX_VMLINUX", 1 << 20)
    bomb = gzip.compress(b"\x7fELF" + b"\0" * (4 << 20))
    with pytest.raises(ProfileError, match="more than"):
        vmlinuz.extract_vmlinux(fz.bzimage(bomb))


# -- ISF reader -------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)


@FAST
@given(_json, st.sampled_from(["metadata", "base_types", "user_types", "enums", "symbols", None]))
def test_isf_reader_shapes(value: object, drop: str | None) -> None:
    from shadowvol.symbols import parse_profile

    isf = fz.isf_seed()
    for doc in (value, {**isf, **({drop: value} if drop else {})}):
        try:
            parse_profile(json.dumps(doc).encode())
        except ProfileError:
            pass


@pytest.mark.parametrize("raw", [
    b'{"symbols": {}, "user_types": {}}',              # KeyError: 'enums' in issue 9
    b"[" * 100_000 + b"]" * 100_000,                    # nesting
    b"\xff\xfe not utf-8",
    lzma.compress(b'{"a": 1}')[:-5],                    # truncated xz
    b"",
])
def test_isf_reader_probes(raw: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowvol.profiles import load_profile

    monkeypatch.setenv("SHADOWVOL_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "p.json"
    p.write_bytes(raw)
    with pytest.raises(ProfileError):
        load_profile(p)


# -- dumps -------------------------------------------------------------------------

@FAST
@given(st.binary(max_size=600))
def test_dump_parsers_arbitrary(data: bytes) -> None:
    from shadowvol.backends.dump import parse_elf, parse_lime

    for parse, head in ((parse_lime, struct.pack("<II", 0x4C694D45, 1)),
                        (parse_elf, b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HH", 4, 62))):
        for buf in (data, head + data):
            try:
                parse(buf)
            except ShadowvolError:
                pass


# -- QMP ---------------------------------------------------------------------------

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\n'


@pytest.mark.parametrize("stream", [
    b"garbage\n", b"\xff\xfe\n", b"[1, 2]\n", b'"QMP"\n', b'{"QMP": 1}\n',
    GREETING + b'{"return": {}}\n' + b'{"error": "text, not an object"}\n',
    GREETING + b'{"return": {}}\n' + b'{"return": [1]}\n',
    GREETING + b'{"return": {}}\n' + b'{"neither": 1}\n',
    GREETING + b'{"return": {}}\n' + b"[" * 50_000 + b"\n",
])
def test_qmp_garbage_replies(stream: bytes) -> None:
    from shadowvol.qemu.qmp import QMPClient

    with pytest.raises(VMError):
        q = QMPClient("x", timeout=2.0, sock=fz.FakeSocket(stream, 7))  # type: ignore[arg-type]
        q.query("query-status")


@pytest.mark.parametrize("reply, state", [
    (b'{"status": "running", "singlestep": false, "running": true}', (True, "running")),
    (b'{"status": "debug", "singlestep": false, "running": false}', (False, "debug")),
    (b'{"running": false}', (False, "?")),
    (b'{"status": "running"}', None),
    (b'{"status": "running", "running": "yes"}', None),
    (b'{"status": "running", "running": 1}', None),
])
def test_qmp_run_state(reply: bytes, state: tuple[bool, str] | None) -> None:
    """``run_state``: QEMU's ``running`` flag and run state; a reply without a
    boolean flag is an error, never read as running or as paused."""
    from shadowvol.qemu.qmp import QMPClient

    stream = GREETING + b'{"return": {}}\n' + b'{"return": ' + reply + b'}\n'
    q = QMPClient("x", timeout=2.0, sock=fz.FakeSocket(stream, 1 << 20))  # type: ignore[arg-type]
    if state is None:
        with pytest.raises(VMError, match="no 'running' flag"):
            q.run_state()
    else:
        assert q.run_state() == state


def _serve(sock: socket.socket, chunks: list[bytes], pause: float) -> threading.Thread:
    def run() -> None:
        try:
            for c in chunks:
                sock.sendall(c)
                time.sleep(pause)
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_qmp_dribbling_peer_hits_overall_deadline() -> None:
    """One byte every 0.2 s never trips a per-recv timeout; the deadline ends it."""
    from shadowvol.qemu.qmp import QMPClient

    a, b = socket.socketpair()
    _serve(b, [bytes([c]) for c in GREETING], 0.2)
    t0 = time.monotonic()
    with pytest.raises(VMError, match="within"):
        QMPClient("x", timeout=1.0, sock=a)
    assert time.monotonic() - t0 < 5.0
    b.close()


def test_qmp_event_flood_hits_deadline() -> None:
    from shadowvol.qemu.qmp import QMPClient

    a, b = socket.socketpair()
    event = b'{"event": "RTC_CHANGE", "data": {}}\n'
    _serve(b, [GREETING + b'{"return": {}}\n'] + [event * 200] * 5000, 0.001)
    q = QMPClient("x", timeout=1.0, sock=a)
    t0 = time.monotonic()
    with pytest.raises(VMError):
        q.execute("query-status")
    assert time.monotonic() - t0 < 5.0
    b.close()


def test_qmp_reply_size_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowvol.qemu import qmp

    monkeypatch.setattr(qmp, "MAX_REPLY", 1000)
    stream = GREETING + b'{"return": {}}\n' + b'{"return": "' + b"x" * 5000 + b'"}\n'
    q = qmp.QMPClient("x", timeout=2.0, sock=fz.FakeSocket(stream, 512))  # type: ignore[arg-type]
    with pytest.raises(VMError, match="longer than"):
        q.hmp("info registers")


# -- gdbstub -------------------------------------------------------------------------

def test_gdbstub_dribbling_peer_hits_overall_deadline() -> None:
    from shadowvol.qemu.gdbstub import GdbError, GdbStub

    a, b = socket.socketpair()
    reply = b"+$" + b"PacketSize=1000" + b"#%02x" % (sum(b"PacketSize=1000") & 0xFF)
    _serve(b, [bytes([c]) for c in reply], 0.2)
    g = GdbStub("x", timeout=1.0, connect=False)
    t0 = time.monotonic()
    with pytest.raises(GdbError, match="within"):
        g.attach_socket(a)
    assert time.monotonic() - t0 < 5.0
    b.close()


def test_gdbstub_target_xml_include_loop_and_garbage() -> None:
    from shadowvol.qemu.gdbstub import GdbError, parse_target_xml

    loop = {"target.xml": '<target><xi:include href="a.xml"/></target>',
            "a.xml": '<feature><xi:include href="target.xml"/></feature>'}
    with pytest.raises(GdbError):
        parse_target_xml(loop)
    for doc in ("<target", '<feature><reg name="x" bitsize="big"/></feature>',
                '<feature><reg bitsize="8"/></feature>', '<target><xi:include href="nope.xml"/></target>'):
        with pytest.raises(GdbError):
            parse_target_xml({"target.xml": doc})


@FAST
@given(st.lists(st.binary(max_size=60), max_size=12), st.booleans())
def test_gdbstub_arbitrary_replies(payloads: list[bytes], raw: bool) -> None:
    data = b"\n".join(payloads)
    try:
        fz.t_gdbstub((b"$" + data) if raw else data)
    except ShadowvolError:
        pass


# -- the fuzz harness, a short slice ---------------------------------------------------

def test_fuzz_slice() -> None:
    """~3,500 mutated inputs over every parser family: no non-project exception."""
    for name in sorted(fz.seeds()):
        r = fz.run_parser(name, 500, seed=9)
        assert r["non_project"] == 0, (name, r["findings"], r["examples"])
