"""linux.library_list on a live guest against the guest's own /proc/PID/maps.

The guest image carries one dynamically linked program (``sv-dynamic``: libm,
libc and the loader, copied from the host). Each shared object the loader
linked is mapped from its file; library_list reads the loader's link maps
(``struct link_map`` in the process's memory) and must name each library
mapped, at its load address: the start of its first mapping (the libraries
are position-independent, linked at 0), and the vDSO at ``[vdso]``.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def dynamic_pid(web01, guest):
    out = guest("sv-dynamic </dev/null >/dev/null 2>&1 & echo $!; sleep 0.5")
    pid = int(out.split()[0])
    yield pid
    guest(f"kill {pid} 2>/dev/null; true", check=False)


def _libraries_mapped(maps: str) -> dict[str, int]:
    """path -> start of its first mapping, for each shared object (and the vDSO) in ``maps``."""
    first: dict[str, int] = {}
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        start = int(fields[0].split("-")[0], 16)
        path = fields[5]
        if path == "[vdso]":
            path = "linux-vdso.so.1"  # the loader's name for it (the kernel's image has no file)
        elif not re.search(r"\.so(\.\d+)*$", path):
            continue
        first[path] = min(start, first.get(path, start))
    return first


@pytest.mark.parametrize("backend", ["shadow", "libvmi"])
def test_library_list_names_every_library_mapped(web01, guest, dynamic_pid, backend):
    maps = guest(f"cat /proc/{dynamic_pid}/maps")
    expected = _libraries_mapped(maps)
    assert {"/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libm.so.6"} <= set(expected), maps
    r = run_cli("-vm", "web01", "--backend", backend, "-r", "json", "linux.library_list.LibraryList",
                "--pid", str(dynamic_pid))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["Path"]: row["LoadAddress"] for row in rows} == expected
    assert {(row["Name"], row["Pid"]) for row in rows} == {("sv-dynamic", dynamic_pid)}
    assert len(rows) == len(expected)
