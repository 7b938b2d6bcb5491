"""Event tracing: the in-guest stub's rings (shadow) and gdbstub breakpoints (libvmi)."""
