"""``refattn precompile``: compile every numba kernel variant now, into numba's on-disk cache.

For CI images and containers: run it once when the image is built (after ``pip install``), and no
later process compiles. Without it, each kernel variant compiles on first use (one line on stderr
says so) and is cached for later runs. The cache lives beside the installed package
(``refattn/backends/numba_/__pycache__``), or in ``NUMBA_CACHE_DIR`` when that is set -- so set it
the same way when the image is built and when it runs. It is valid for this CPU model and this
numba version.
"""

from __future__ import annotations

import time

import click

from refattn import backends
from .options import EXIT_OK, one_line_errors


@click.command("precompile")
@click.option("--dtype", type=click.Choice(["float64", "float32", "both"]), default="both",
              show_default=True, help="Compute dtype(s) whose kernels to compile.")
@one_line_errors
def command(dtype):
    """Compile (or load from the cache) every numba kernel variant ahead of time."""
    be = backends.get("numba")
    dtypes = ("float64", "float32") if dtype == "both" else (dtype,)
    t0 = time.perf_counter()
    be.warm(dtypes=dtypes, progress=lambda what: click.echo(f"numba kernels: {what}", err=True))
    click.echo(f"numba kernels ready ({', '.join(dtypes)}) in {time.perf_counter() - t0:.1f} s")
    raise click.exceptions.Exit(EXIT_OK)
