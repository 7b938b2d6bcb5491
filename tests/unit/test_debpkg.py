"""Kernel package resolution on captured ``apt-cache show`` / ``dpkg-deb -c`` text."""

from __future__ import annotations

import pytest

from shadowvol.errors import VMError
from shadowvol.vm.debpkg import (declared_kernel, parse_control, parse_listing, parse_relations,
                                 resolve_kernel_package)

# apt-cache show --no-all-versions, Debian 12 (bookworm-security), November 2026.
APT_SHOW = {
    "linux-image-6.12-amd64": """\
Package: linux-image-6.12-amd64
Source: linux-signed-6.12-amd64 (6.12.117+1~deb12u1)
Version: 6.12.117-1~deb12u1
Installed-Size: 13
Maintainer: Debian Kernel Team <debian-kernel@lists.debian.org>
Architecture: amd64
Provides: linux-latest-modules-6.12.117+deb12-amd64, virtualbox-guest-modules, wireguard-modules (= 1.0.0)
Depends: linux-image-6.12.117+deb12-amd64 (= 6.12.117-1~deb12u1)
Description: Linux for 64-bit PCs (meta-package)
Section: kernel
Priority: optional

""",
    "linux-image-6.12.117+deb12-amd64": """\
Package: linux-image-6.12.117+deb12-amd64
Source: linux-signed-6.12-amd64 (6.12.117+1~deb12u1)
Version: 6.12.117-1~deb12u1
Installed-Size: 107638
Architecture: amd64
Replaces: linux-image-6.12.117+deb12-amd64-unsigned
Depends: kmod, initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
Suggests: firmware-linux-free, linux-doc-6.12, debian-kernel-handbook, grub-pc | grub-efi-amd64 | extlinux
Conflicts: linux-image-6.12.117+deb12-amd64-unsigned
Breaks: fwupdate (<< 12-7), initramfs-tools (<< 0.120+deb8u2), wireless-regdb (<< 2019.06.03-1~)
Description: Linux 6.12 for 64-bit PCs (signed)
Built-Using: linux-6.12 (= 6.12.117-1~deb12u1)
Pre-Depends: linux-base (>= 4.12~)
Recommends: apparmor
Section: kernel

""",
    "linux-image-6.12-cloud-amd64": """\
Package: linux-image-6.12-cloud-amd64
Source: linux-signed-6.12-amd64 (6.12.117+1~deb12u1)
Version: 6.12.117-1~deb12u1
Installed-Size: 13
Provides: linux-latest-modules-6.12.117+deb12-cloud-amd64, virtualbox-guest-modules, wireguard-modules (= 1.0.0)
Depends: linux-image-6.12.117+deb12-cloud-amd64 (= 6.12.117-1~deb12u1)
Description: Linux for x86-64 cloud (meta-package)
Section: kernel

""",
    "linux-image-6.12.117+deb12-cloud-amd64": """\
Package: linux-image-6.12.117+deb12-cloud-amd64
Version: 6.12.117-1~deb12u1
Installed-Size: 75310
Depends: kmod, initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
Pre-Depends: linux-base (>= 4.12~)
Description: Linux 6.12 for x86-64 cloud (signed)
Section: kernel

""",
    "linux-image-6.12-rt-amd64": """\
Package: linux-image-6.12-rt-amd64
Version: 6.12.117-1~deb12u1
Installed-Size: 13
Depends: linux-image-6.12.117+deb12-rt-amd64 (= 6.12.117-1~deb12u1)
Description: Linux for 64-bit PCs (meta-package)
Section: kernel

""",
    "linux-image-6.12.117+deb12-rt-amd64": """\
Package: linux-image-6.12.117+deb12-rt-amd64
Version: 6.12.117-1~deb12u1
Depends: kmod, initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
Description: Linux 6.12 for 64-bit PCs, PREEMPT_RT (signed)
Section: kernel

""",
    "linux-image-rt-amd64": """\
Package: linux-image-rt-amd64
Source: linux-signed-amd64 (6.1.192+3)
Version: 6.1.192-3
Installed-Size: 13
Architecture: amd64
Provides: linux-latest-modules-6.1.0-57-rt-amd64, virtualbox-guest-modules, wireguard-modules (= 1.0.0)
Depends: linux-image-6.1.0-57-rt-amd64 (= 6.1.192-3)
Description: Linux for 64-bit PCs (meta-package)
Built-Using: linux (= 6.1.192-3)
Section: kernel

""",
    "linux-image-6.1.0-57-rt-amd64": """\
Package: linux-image-6.1.0-57-rt-amd64
Source: linux-signed-amd64 (6.1.192+3)
Version: 6.1.192-3
Installed-Size: 400790
Architecture: amd64
Replaces: linux-image-6.1.0-57-rt-amd64-unsigned
Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
Suggests: linux-doc-6.1, debian-kernel-handbook, grub-pc | grub-efi-amd64 | extlinux
Conflicts: linux-image-6.1.0-57-rt-amd64-unsigned
Description: Linux 6.1 for 64-bit PCs, PREEMPT_RT (signed)
Built-Using: linux (= 6.1.192-3)
Recommends: firmware-linux-free, apparmor
Section: kernel

""",
    "linux-image-amd64": """\
Package: linux-image-amd64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)
Description: Linux for 64-bit PCs (meta-package)
Section: kernel

""",
    "linux-image-6.1.0-57-amd64": """\
Package: linux-image-6.1.0-57-amd64
Version: 6.1.192-3
Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
Description: Linux 6.1 for 64-bit PCs (signed)
Section: kernel

""",
    "linux-image-amd64-dbg": """\
Package: linux-image-amd64-dbg
Source: linux
Version: 6.1.192-3
Installed-Size: 13
Provides: linux-latest-image-dbg
Depends: linux-image-6.1.0-57-amd64-dbg (= 6.1.192-3)
Description: Debugging symbols for Linux amd64 configuration (meta-package)
Section: kernel

""",
    "linux-image-6.1.0-57-amd64-dbg": """\
Package: linux-image-6.1.0-57-amd64-dbg
Source: linux
Version: 6.1.192-3
Description: Debug symbols for linux-image-6.1.0-57-amd64
Section: debug

""",
}


def fake_show(name: str) -> str:
    try:
        return APT_SHOW[name]
    except KeyError:
        raise VMError(f"{name}: no such package in the apt lists") from None


@pytest.mark.parametrize("meta,real", [
    ("linux-image-6.12-amd64", "linux-image-6.12.117+deb12-amd64"),
    ("linux-image-6.12-cloud-amd64", "linux-image-6.12.117+deb12-cloud-amd64"),
    ("linux-image-6.12-rt-amd64", "linux-image-6.12.117+deb12-rt-amd64"),
    ("linux-image-rt-amd64", "linux-image-6.1.0-57-rt-amd64"),
    ("linux-image-amd64", "linux-image-6.1.0-57-amd64"),
    # A real package resolves to itself, whatever its name looks like.
    ("linux-image-6.12.117+deb12-cloud-amd64", "linux-image-6.12.117+deb12-cloud-amd64"),
    ("linux-image-6.1.0-57-rt-amd64", "linux-image-6.1.0-57-rt-amd64"),
])
def test_metapackages_resolve_by_their_depends(meta: str, real: str) -> None:
    assert resolve_kernel_package(meta, show=fake_show) == real


def test_metapackage_with_digits_is_not_taken_for_the_kernel() -> None:
    """linux-image-6.12-amd64 has digits after linux-image-, yet declares a
    dependency on the kernel: it is followed (issue 10)."""
    assert declared_kernel(APT_SHOW["linux-image-6.12-amd64"]) == "linux-image-6.12.117+deb12-amd64"
    assert declared_kernel(APT_SHOW["linux-image-6.12.117+deb12-amd64"]) is None


def test_dependency_cycle_is_an_error() -> None:
    loop = {"linux-image-a": "Package: linux-image-a\nDepends: linux-image-b\n",
            "linux-image-b": "Package: linux-image-b\nDepends: linux-image-a (>= 1)\n"}
    with pytest.raises(VMError, match="cycle"):
        resolve_kernel_package("linux-image-a", show=loop.__getitem__)


def test_unknown_package_is_an_error() -> None:
    with pytest.raises(VMError, match="no such package"):
        resolve_kernel_package("linux-image-nonesuch", show=fake_show)


def test_parse_control_and_relations() -> None:
    fields = parse_control(APT_SHOW["linux-image-6.12.117+deb12-amd64"] + "Package: second\n")
    assert fields["Package"] == "linux-image-6.12.117+deb12-amd64"
    assert fields["Pre-Depends"] == "linux-base (>= 4.12~)"
    assert parse_relations(fields["Depends"]) == [["kmod"], ["initramfs-tools", "linux-initramfs-tool"]]
    assert parse_relations("a:any (>= 1) [amd64], b | c") == [["a"], ["b", "c"]]
    assert parse_control("Description: one\n two\n .\n three\n")["Description"] == "one\ntwo\n.\nthree"


# dpkg-deb -c of the real kernel packages (./boot only) and of a -dbg package.
LISTING_6_12 = """\
drwxr-xr-x root/root         0 2026-11-14 12:56 ./
drwxr-xr-x root/root         0 2026-11-14 12:56 ./boot/
-rw-r--r-- root/root        83 2026-11-14 12:56 ./boot/System.map-6.12.117+deb12-cloud-amd64
-rw-r--r-- root/root    132616 2026-11-14 12:56 ./boot/config-6.12.117+deb12-cloud-amd64
-rw-r--r-- root/root  11655104 2026-11-14 12:56 ./boot/vmlinuz-6.12.117+deb12-cloud-amd64
drwxr-xr-x root/root         0 2026-11-14 12:56 ./lib/modules/6.12.117+deb12-cloud-amd64/
"""
LISTING_DBG = """\
drwxr-xr-x root/root         0 2026-11-26 17:12 ./usr/lib/debug/boot/
-rw-r--r-- root/root 590000000 2026-11-26 17:12 ./usr/lib/debug/boot/vmlinux-6.1.0-57-amd64
lrwxrwxrwx root/root         0 2026-11-26 17:12 ./boot/vmlinuz-6.1.0-57-amd64 -> elsewhere
"""


def test_release_from_the_shipped_vmlinuz() -> None:
    assert parse_listing(LISTING_6_12) == "6.12.117+deb12-cloud-amd64"
    assert parse_listing(LISTING_DBG) is None  # no regular /boot/vmlinuz-*: not an image package
