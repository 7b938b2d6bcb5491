"""QEMU plumbing shared by the backends and the VM tooling: what QEMU's monitor says, parsed.

- :mod:`shadowvol.qemu.ramlayout`: the RAM block and its guest-physical segments.

The QMP and gdbstub clients are still :mod:`shadowvol.qmp` and :mod:`shadowvol.gdbstub`.
"""
