"""``refattn mask``: draw a variant's attention pattern in the terminal (and optionally as a PNG).

Each character is one tile of the ``Sq x Sk`` pattern for one batch item and head, classified
exactly by :meth:`refattn.patterns.Pattern.block_layout` (no ``Sq x Sk`` work for structured
patterns, so ``--seq 16384`` is instant): ``█`` every pair visible, ``▒`` some, `` `` (blank) none.
A tile is twice as tall as it is wide, so the picture has the matrix's proportions. Below it: the
density and the visible/total pair counts. Data-dependent patterns (``block_sparse`` by top-k,
``seer``, ``nsa``) are drawn for the variant's example inputs made from ``--seed``.
"""

from __future__ import annotations

import click
import numpy as np

from refattn import memory, variants
from refattn.errors import ParameterError
from refattn.validate import check_int
from refattn.patterns import EMPTY, FULL
from .options import EXIT_USAGE, one_line_errors, param_option, parse_params

GLYPHS = {FULL: "█", EMPTY: " "}
PARTIAL_GLYPH = "▒"


def _params(var, items):
    values = parse_params(var, items, array_names=())
    return var.parse_params(values)


def _inputs(var, seq, heads, seed, params):
    from refattn.variants.sparse import sparse_example
    example = var.example or sparse_example(None)
    b, hq, sq, sk, d, hkv = var.default_shape
    if seq is not None:
        sq = sk = seq
    if heads is not None:
        hq = hkv = heads
    memory.check(memory.attention_bytes((1, hq, sq, sk, d, hkv), copies=2), "--seq",
                 f"the example inputs and pattern of {hq} heads x {sq} tokens")
    seed = check_int(seed, "--seed", 0, 2 ** 63 - 1)
    return example((1, hq, sq, sk, d, hkv), np.random.default_rng(seed), params), (sq, sk, hq)


def draw(layout2d: np.ndarray) -> str:
    """Rows of glyphs for a 2-d array of tile codes, framed."""
    width = layout2d.shape[1]
    lines = ["┌" + "─" * width + "┐"]
    for row in layout2d:
        lines.append("│" + "".join(GLYPHS.get(int(c), PARTIAL_GLYPH) for c in row) + "│")
    lines.append("└" + "─" * width + "┘")
    return "\n".join(lines)


def write_png(pattern, sq, sk, b, h, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        click.echo("Error: --png: needs matplotlib, which is not installed: "
                   "pip install 'refattn[plot]'", err=True)
        raise click.exceptions.Exit(EXIT_USAGE) from None
    cell = max(1, -(-max(sq, sk) // 2048))
    if cell == 1:
        m = pattern.mask(sq, sk)
        img = m[b if m.shape[0] > 1 else 0, h if m.shape[1] > 1 else 0].astype(float)
    else:  # one pixel per cell x cell tile: 1 full, 0.5 partial, 0 empty
        lay = pattern.block_layout(cell, cell, sq=sq, sk=sk)
        img = lay[b if lay.shape[0] > 1 else 0, h if lay.shape[1] > 1 else 0] / 2.0
    fig, ax = plt.subplots(figsize=(6, 6 * sq / max(sk, 1) + 0.5))
    ax.imshow(img, cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, sk, sq, 0))
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=150)
    except OSError as exc:
        raise ParameterError(f"--png: cannot write {path!r} ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


@click.command("mask")
@click.option("--variant", "-v", "variant", metavar="NAME", required=True,
              help="Variant whose pattern to draw (refattn list --family sparse).")
@param_option
@click.option("--seq", type=click.IntRange(min=1), default=None,
              help="Sequence length Sq = Sk. Default: the variant's example length.")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Number of heads of the made inputs. Default: the variant's example.")
@click.option("--head", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which head to draw (patterns may differ per head).")
@click.option("--batch-item", "batch_item", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which batch item to draw (global masks may differ per item).")
@click.option("--width", type=click.IntRange(min=8, max=400), default=64, show_default=True,
              help="Characters per row of the drawing (one tile each).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the example inputs (data-dependent selections).")
@click.option("--png", "png", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write a picture to this PNG file (needs matplotlib: refattn[plot]).")
@one_line_errors
def command(variant, params, seq, heads, head, batch_item, width, seed, png):
    """Draw the attention pattern of a variant: which keys each query sees.

    \b
    Example:
      refattn mask --variant bigbird --seq 1024 --param block_size=64
    """
    from refattn.variants.sparse import pattern_of

    var = variants.get(variant)
    p = _params(var, params)
    arrays, (sq, sk, hq) = _inputs(var, seq, heads, seed, p)
    if head >= hq:
        raise ParameterError(f"--head: expected a head in [0, {hq}), got {head}")
    pattern = pattern_of(var, arrays, p)
    cell_k = max(1, -(-sk // width))
    cell_q = 2 * cell_k
    lay = pattern.block_layout(cell_q, cell_k, sq=sq, sk=sk)
    b = batch_item if lay.shape[0] > 1 else 0
    h = head if lay.shape[1] > 1 else 0
    if batch_item and lay.shape[0] > 1 and batch_item >= lay.shape[0]:
        raise ParameterError(f"--batch-item: expected an item in [0, {lay.shape[0]}), got {batch_item}")
    counts = pattern.count(sq, sk)
    visible = int(counts[b if counts.shape[0] > 1 else 0, h if counts.shape[1] > 1 else 0])
    title = f"{var.name}  Sq={sq} Sk={sk}  head {head}"
    click.echo(title)
    click.echo(f"pattern: {pattern!r}")
    click.echo(draw(lay[b, h]))
    click.echo(f"tile {cell_q}x{cell_k}: █ all visible  ▒ some  (blank) none")
    click.echo(f"density {visible / (sq * sk):.4f}  visible pairs {visible:,} of {sq * sk:,}")
    if png:
        write_png(pattern, sq, sk, b, h, png, title)
        click.echo(f"wrote {png}")
