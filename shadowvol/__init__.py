"""shadowvol: look into live Linux virtual machines from the outside.

Layers of the stack, top to bottom, and the module that owns each (the full
map, and the rules between layers, in ARCHITECTURE.md):

- :mod:`shadowvol.plugins`: Volatility-3 plugins of our own (``linux/``), shipped with the package.
- :mod:`shadowvol.volbridge`: runs stock volatility3 plugins on live layers.
- :mod:`shadowvol.symbols`: ISF profiles built from BTF, kallsyms, DWARF.
- :mod:`shadowvol.paging` / :mod:`shadowvol.kaslr`: x86-64 translation, KASLR.
- :mod:`shadowvol.backends`: physical memory sources (shadow, libvmi, dump).
- :mod:`shadowvol.qemu`: what QEMU's monitor says, parsed (the RAM layout).
- :mod:`shadowvol.vm`: building, booting and driving test guests under QEMU.
"""

__version__ = "0.1.0"
