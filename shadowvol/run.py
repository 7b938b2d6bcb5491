"""``shadowvol (-vm SPEC | -f DUMP) [options] PLUGIN [plugin options]``.

Only the requested plugin is imported; the profile comes from the fast store;
the kernel location from the per-boot cache. Each run is one snapshot epoch.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ShadowvolError

RENDERERS = {
    "pretty": "PrettyTextRenderer",
    "quick": "QuickTextRenderer",
    "json": "JsonRenderer",
    "jsonl": "JsonLinesRenderer",
    "csv": "CSVRenderer",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse but via our error path
        raise ShadowvolError(f"{self.prog}: {message}")


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shadowvol", description="Run a Volatility 3 plugin on a live VM or a dump.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-vm", dest="vm", metavar="SPEC", help="NAME, qmp:/path/qmp.sock or pid:NNN")
    src.add_argument("-f", dest="dump", metavar="DUMP", help="raw, LiME or QEMU ELF dump")
    p.add_argument("--backend", default="shadow", choices=["shadow", "libvmi"])
    p.add_argument("-r", "--renderer", default="quick", choices=sorted(RENDERERS))
    p.add_argument("--profile", help="ISF profile to use instead of the store's")
    p.add_argument("-o", "--output-dir", default=".", metavar="DIR",
                   help="where plugins write the files they extract (as vol -o; default: here)")
    p.add_argument("-v", "--verbose", action="store_true", help="show volatility3 warnings")
    p.add_argument("--partial", action="store_true",
                   help="accept a dump shorter than its layout (a warning instead of an error)")
    p.add_argument("plugin", nargs="?")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _plugin_parser(plugin_cls: type, name: str) -> argparse.ArgumentParser:
    from volatility3.framework.configuration import requirements

    from .volbridge import plugin_options

    p = _Parser(prog=f"shadowvol ... {name}")
    for req in plugin_options(plugin_cls):
        flag = "--" + req.name.replace("_", "-")
        if isinstance(req, requirements.BooleanRequirement):
            p.add_argument(flag, dest=req.name, action="store_true", default=None, help=req.description)
        elif isinstance(req, requirements.ListRequirement):
            p.add_argument(flag, dest=req.name, nargs="+", type=req.element_type, help=req.description)
        elif isinstance(req, requirements.IntRequirement):
            p.add_argument(flag, dest=req.name, type=lambda s: int(s, 0), help=req.description)
        elif isinstance(req, requirements.ChoiceRequirement):
            p.add_argument(flag, dest=req.name, choices=req.choices, help=req.description)
        else:
            p.add_argument(flag, dest=req.name, help=req.description)
    return p


def file_handler(output_dir: str) -> type:
    """volatility3's own CLI file handler class, writing into ``output_dir`` (as ``vol -o``)."""
    from volatility3.cli import CommandLine

    if not os.path.isdir(output_dir):
        raise ShadowvolError(f"output directory {output_dir} does not exist (-o DIR)")
    cli = CommandLine()
    cli.output_dir = os.path.abspath(output_dir)
    return cli.file_handler_class_factory()


def run_plugin(target, plugin_name: str, options: dict | None = None, output_dir: str | None = None):
    """Run a plugin on a :class:`~shadowvol.target.Target`; returns the TreeGrid (populated)."""
    from . import volbridge

    plugin_cls = volbridge.load_plugin(plugin_name)
    ctx = volbridge.build_context(target.memory, target.kernel, target.location, target.isf,
                                  isf_url=target.profile_path.as_uri())
    handler = file_handler(output_dir) if output_dir is not None else None
    plugin = volbridge.construct_plugin(ctx, plugin_cls, options or {}, file_handler=handler)
    return plugin.run()


def run_plugin_cli(argv: list[str]) -> int:
    args = _top_parser().parse_args(argv)
    if not args.plugin:
        raise ShadowvolError("which plugin? e.g. shadowvol -vm NAME linux.pslist "
                             "('shadowvol plugins' lists them all)")
    if not os.path.isdir(args.output_dir):
        raise ShadowvolError(f"output directory {args.output_dir} does not exist (-o DIR)")
    from . import volbridge
    from .target import open_target

    if not args.verbose:
        volbridge.quiet_volatility()
    plugin_cls = volbridge.load_plugin(args.plugin)
    popts = {k: v for k, v in vars(_plugin_parser(plugin_cls, args.plugin).parse_args(args.args)).items()
             if v is not None}
    target = open_target(vm=args.vm, dump=args.dump, backend=args.backend, profile=args.profile,
                         partial=args.partial)
    for warning in target.warnings:
        print(f"shadowvol: warning: {warning}", file=sys.stderr)
    try:
        from volatility3.cli import text_renderer

        grid = run_plugin(target, args.plugin, popts, output_dir=args.output_dir)
        renderer = getattr(text_renderer, RENDERERS[args.renderer])()
        renderer.render(grid)
        sys.stdout.flush()
    finally:
        target.close()
    return 0
