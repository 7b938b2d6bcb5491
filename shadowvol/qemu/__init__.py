"""QEMU plumbing shared by the backends, the resolver, trace and the VM tooling.

- :mod:`shadowvol.qemu.qmp`: the QMP client;
- :mod:`shadowvol.qemu.gdbstub`: the GDB remote protocol client for QEMU's gdbstub;
- :mod:`shadowvol.qemu.monitor`: HMP output parsed (``xp``, ``gpa2hva``, ``info registers``);
- :mod:`shadowvol.qemu.ramlayout`: the RAM block and its guest-physical segments;
- :mod:`shadowvol.qemu.process`: a QEMU process's command line and where its RAM is mapped.

Backends only map and read; what QEMU says, and how to ask it, lives here.
"""
