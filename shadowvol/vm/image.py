"""Guest images built from Debian packages only.

An image is a directory in the cache, keyed by kernel release::

    images/<release>/vmlinuz, config, initramfs.cpio.gz, manifest.json
    images/<release>/headers/   (linux-headers + kbuild, extracted, for modules)

The initramfs holds busybox-static, busybox init with our rc script (the web01
story: httpd and long-lived workers), the control agent on ttyS1, the static
workload programs compiled on the host, one dynamically linked program with
the host's shared libraries and loader (for library_list, elfs and maps),
and the few kernel modules a stock
guest would load on QEMU (qemu_fw_cfg, which feeds the vmcoreinfo device).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import paths
from ..errors import VMError
from ..safeio import atomic_copy, atomic_write
from . import debpkg

GUEST_DIR = Path(__file__).parent / "guest"
BUSYBOX = Path("/bin/busybox")
DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
# Modules a Debian guest on QEMU loads through udev, copied with their deps.
GUEST_MODULES = ["qemu_fw_cfg"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    """A built guest image on disk."""

    release: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.root / "initramfs.cpio.gz"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def headers(self) -> Path:
        return self.root / "headers"

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    @property
    def profile(self) -> Path:
        return self.root / "profile.isf"

    def stub_unavailable(self) -> str | None:
        """Why this image has no guest stub (None when it has one)."""
        man = self.manifest
        if man.get("stub"):
            return None
        why = man.get("stub_error") or "the image was built without it"
        return f"the guest stub is unavailable on kernel {self.release}: {why}"


def images_dir() -> Path:
    d = paths.cache_dir() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def list_images() -> list[Image]:
    out = []
    for d in sorted(images_dir().iterdir()):
        if (d / "manifest.json").exists() and (d / "initramfs.cpio.gz").exists():
            out.append(Image(d.name, d))
    return out


def find_image(spec: str | None = None) -> Image:
    """The image for a release, a kernel package name, or the default one."""
    images = list_images()
    if not images:
        raise VMError("no guest image built yet: run 'shadowvol vm build' first")
    if spec is None:
        for img in images:
            if img.manifest.get("package") == DEFAULT_KERNEL_PACKAGE:
                return img
        return images[-1]
    for img in images:
        if spec == img.release or spec in _names(img.manifest):
            return img
    raise VMError(f"no image for {spec!r}; built: {', '.join(i.release for i in images)}")


def _inputs_digest() -> str:
    """Hash of everything that goes into the initramfs, to detect stale builds."""
    h = hashlib.sha256()
    for p in sorted(GUEST_DIR.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(GUEST_DIR).as_posix().encode())
            h.update(p.read_bytes())
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    h.update(repr(GUEST_MODULES).encode())
    h.update(Path(__file__).read_bytes())
    stub = _stub_dir()
    if stub is not None:
        for p in sorted(stub.glob("*")):
            if p.is_file() and p.suffix in (".c", ".h") or p.name in ("Kbuild", "Makefile"):
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _stub_dir() -> Path | None:
    """guest_stub/ of the source checkout, when present (issue 4's module)."""
    d = Path(__file__).resolve().parents[2] / "guest_stub"
    return d if (d / "Kbuild").exists() or (d / "Makefile").exists() else None


class CpioWriter:
    """Write a ``newc`` cpio archive (the initramfs format)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root)
            if rel != Path("."):
                self._entry(rel.as_posix(), stat.S_IFDIR | 0o755, nlink=2)
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                name = (rel / fn).as_posix()
                st = p.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self._entry(name, stat.S_IFLNK | 0o777, os.readlink(p).encode())
                else:
                    self._entry(name, stat.S_IFREG | (st.st_mode & 0o7777), p.read_bytes())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _module_deps(moddir: Path, names: list[str]) -> list[Path]:
    """The .ko files for ``names`` and their dependencies, in load order."""
    dep_lines = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, deps = line.partition(":")
        dep_lines[Path(mod).name.split(".ko")[0].replace("-", "_")] = (mod, deps.split())
    order: list[Path] = []

    def visit(rel: str) -> None:
        base = Path(rel).name.split(".ko")[0].replace("-", "_")
        mod, deps = dep_lines[base]
        for d in reversed(deps):
            visit(d)
        p = moddir / mod
        if p not in order:
            order.append(p)

    for n in names:
        if n in dep_lines:
            visit(dep_lines[n][0])
    return order


def _decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def _gcc(src: Path, exe: Path, flags: tuple[str, ...], libs: tuple[str, ...] = (), hint: str = "") -> Path:
    """``gcc -O2 -Wall FLAGS -o EXE SRC LIBS``; a failure is a VMError naming ``src``."""
    proc = subprocess.run(["gcc", *flags, "-O2", "-Wall", "-o", str(exe), str(src), *libs],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise VMError(f"compiling {src.name} failed: {proc.stderr.strip().splitlines()[-1:]}{hint}")
    return exe


def compile_workloads(dest: Path) -> list[Path]:
    """Compile the static workload programs (syscall loop, fork/exec, file copy)."""
    return [_gcc(src, dest / src.stem, ("-static",), hint=" (static glibc comes with libc6-dev)")
            for src in sorted((GUEST_DIR / "workloads").glob("*.c"))]


def compile_dynamic(dest: Path, root: Path) -> list[Path]:
    """Compile the dynamically linked programs (``guest/dynamic``) into ``dest``
    and copy the shared libraries and loader they need (``ldd``: the host's
    glibc) into ``root`` at the paths the loader looks them up by, as plain
    files. Returns the files copied."""
    out = []
    for src in sorted((GUEST_DIR / "dynamic").glob("*.c")):
        exe = _gcc(src, dest / src.stem, ("-Wl,--no-as-needed",), ("-lm",))
        out.append(exe)
        ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True)
        if ldd.returncode != 0:
            raise VMError(f"ldd {exe.name} failed: {ldd.stderr.strip()[-200:]}")
        for line in ldd.stdout.splitlines():
            # "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
            path = line.split("=>")[-1].strip().split(" (")[0].strip()
            if not path.startswith("/"):
                continue  # linux-vdso.so.1: the kernel's
            target = root / path.lstrip("/")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_copy(Path(path).resolve(), target, mode=0o755)
                out.append(target)
    return out


def _build_initramfs(modules: list[Path], stub_ko: Path | None, work: Path) -> bytes:
    root = work / "initramfs"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/init.d", "proc", "sys", "dev",
              "tmp", "run", "root", "lib/modules", "lib/shadowvol", "var/log", "etc/crontabs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    atomic_copy(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = root / applet
        if link.name == "busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (root / "init").symlink_to("/bin/busybox")
    atomic_copy(GUEST_DIR / "inittab", root / "etc/inittab", mode=0o644)
    for src, dst in (("rcS", "etc/init.d/rcS"), ("sv-agent", "sbin/sv-agent")):
        atomic_copy(GUEST_DIR / src, root / dst, mode=0o755)
    atomic_write(root / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644)
    atomic_write(root / "etc/group", b"root:x:0:\n", mode=0o644)
    compile_workloads(root / "usr/bin")
    compile_dynamic(root / "usr/bin", root)
    for i, m in enumerate(modules):
        name = m.name.split(".ko")[0]
        atomic_write(root / "lib/modules" / f"{i:02d}-{name}.ko", _decompress_module(m), mode=0o644)
    if stub_ko is not None:
        atomic_copy(stub_ko, root / "lib/shadowvol/shadow_stub.ko", mode=0o644)
    w = CpioWriter()
    w.add_tree(root)
    return gzip.compress(w.finish(), compresslevel=6)


def extract_headers(debs: list[Path], dest: Path) -> None:
    """Extract the linux-headers and linux-kbuild .debs into ``dest``.

    :func:`shadowvol.symbols.kbuild.prepare_headers` turns that into a tree
    kbuild can use from there (the flavour Makefile includes the common tree
    by an absolute /usr/src path).
    """
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for deb in debs:
        debpkg.extract(deb, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _has_profile(img: Image) -> bool:
    """The store holds this image's profile, built by this version of the builder."""
    from .. import profiles, symbols
    from ..errors import ProfileError

    path = profiles.store_dir() / f"linux-{img.release}.json.xz"
    if not path.exists():
        return False
    try:
        producer = profiles.load_profile(path).get("metadata", {}).get("producer", {})
    except ProfileError:
        return False
    return producer.get("generator_version") == symbols.builder_version()


def build_image(package: str = DEFAULT_KERNEL_PACKAGE, progress: Progress | None = None,
                force: bool = False) -> tuple[Image, bool]:
    """Build (or reuse) the image for a Debian kernel package.

    Returns the image and whether anything was built. A second build with
    the same inputs is a no-op.
    """
    say = progress or (lambda msg: None)
    lock = os.open(images_dir() / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; later callers see its result
        return _build_image(package, say, force)
    finally:
        os.close(lock)


def _built_for(image_pkg: str) -> Image | None:
    """The image already built from the kernel package ``image_pkg``."""
    for img in list_images():
        if img.manifest.get("image_package") == image_pkg:
            return img
    return None


def _build_image(package: str, say: Progress, force: bool) -> tuple[Image, bool]:
    say(f"resolving {package}")
    image_pkg = debpkg.resolve_kernel_package(package)
    digest = _inputs_digest()
    img = _built_for(image_pkg)
    if img is not None and not force:
        man = img.manifest
        if man.get("inputs") == digest and _has_profile(img):
            if package not in _names(man):  # another metapackage of the same kernel
                man["packages"] = [*man.get("packages", []), package]
                _write_manifest(img, man)
            return img, False
    debs_dir = paths.cache_dir() / "debs"
    say(f"downloading {image_pkg}")
    kernel_deb = debpkg.download([image_pkg], debs_dir)[0]
    # The release is the one of the /boot/vmlinuz-<release> it ships.
    release = debpkg.vmlinuz_release(kernel_deb, image_pkg)
    img = Image(release, images_dir() / release)
    img.root.mkdir(parents=True, exist_ok=True)
    header_pkgs = debpkg.headers_packages(release)
    say(f"downloading {len(header_pkgs)} header packages")
    debs = [kernel_deb, *debpkg.download(header_pkgs, debs_dir)]
    with tempfile.TemporaryDirectory(prefix="shadowvol-build-") as tmp:
        work = Path(tmp)
        say(f"extracting {debs[0].name}")
        debpkg.extract(debs[0], work / "kernel")
        boot = work / "kernel/boot"
        vmlinuz = boot / f"vmlinuz-{release}"
        if not vmlinuz.exists():
            raise VMError(f"{image_pkg} has no /boot/vmlinuz-{release}")
        atomic_copy(vmlinuz, img.vmlinuz, mode=0o644)  # a VM booting now reads old or new, never half
        atomic_copy(boot / f"config-{release}", img.config, mode=0o644)
        moddir = work / "kernel/lib/modules" / release
        modules = []
        if moddir.is_dir():
            # modules.dep is made at install time by depmod, so make it here.
            proc = subprocess.run(["depmod", "-b", str(work / "kernel"), release],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise VMError(f"depmod failed for {release}: {proc.stderr.strip()[-200:]}")
            modules = _module_deps(moddir, GUEST_MODULES)
        if not img.headers.exists() or force:
            say("extracting kernel headers for guest modules")
            extract_headers(debs[1:], img.headers)
        stub_ko, stub_error = None, None
        if _stub_dir() is not None:
            say("building the guest stub module")
            from . import kmod
            try:
                stub_ko = kmod.build_module(img, _stub_dir())[0]
            except VMError as exc:
                # The image and its profile stand without the stub.
                stub_error = str(exc)
        say("building initramfs (busybox, agent, workloads)")
        atomic_write(img.initramfs, _build_initramfs(modules, stub_ko, work), mode=0o644)
    if force or not _has_profile(img):
        say("building the symbol profile (BTF + kallsyms + header probe)")
        from .. import profiles, symbols

        isf = symbols.build_profile(vmlinuz=img.vmlinuz, headers=img.headers)
        profiles.write_profile(isf, f"linux-{release}")
    manifest = {
        "release": release,
        "package": package,
        "image_package": image_pkg,
        "debs": [d.name for d in debs],
        "inputs": digest,
        "modules": [m.name for m in modules],
        "stub": stub_ko is not None,
    }
    if stub_error:
        manifest["stub_error"] = stub_error
    _write_manifest(img, manifest)
    return img, True


def _names(manifest: dict) -> list[str]:
    """Every package name an image answers to (``--image P``)."""
    return [n for n in (manifest.get("package"), manifest.get("image_package"),
                        *manifest.get("packages", [])) if n]


def _write_manifest(img: Image, manifest: dict) -> None:
    atomic_write(img.root / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644)
