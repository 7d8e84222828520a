"""``refattn``: the command-line interface (a click group; one module per subcommand).

Exit codes everywhere: 0 success / PASS, 1 numerical mismatch / FAIL, 2 usage or input error.
Subcommand modules are imported only when used, so ``refattn --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from refattn import __version__

#: subcommand name -> module defining ``command`` (a click command or group)
SUBCOMMANDS = {
    "list": "refattn.cli.list_",
    "compare": "refattn.cli.compare",
    "golden": "refattn.cli.golden_",
    "bench": "refattn.cli.bench",
    "mask": "refattn.cli.mask",
    "precompile": "refattn.cli.precompile",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, m in SUBCOMMANDS.items() if importlib.util.find_spec(m) is not None)

    def get_command(self, ctx, name):
        module = SUBCOMMANDS.get(name)
        if module is None or importlib.util.find_spec(module) is None:
            return None
        return importlib.import_module(module).command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refattn")
def cli():
    """refattn: the numerical oracle for attention mechanisms.

    Is my attention output right, and if not, where and by how much?
    """


if __name__ == "__main__":  # pragma: no cover
    cli()
