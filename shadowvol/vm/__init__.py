"""Test guests: build images from Debian packages, boot them under QEMU, drive them.

- :mod:`.debpkg`: resolve, download and extract Debian packages (never installed).
- :mod:`.image`: the guest image (kernel, initramfs with busybox and workloads).
- :mod:`.qemu`: start/stop QEMU, the KVM probe.
- :mod:`.registry`: the per-user VM registry.
- :mod:`.console`: ground truth from inside the guest (``vm exec``, ``vm cp``),
  for tests and demos only; introspection never depends on it.
"""
