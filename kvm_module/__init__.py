"""The hypervisor side: the QEMU machine a monitored guest runs on (``machine``),
and, in README.md, the EPT/VMFUNC design that this host cannot run."""
