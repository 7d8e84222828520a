"""``refattn list``: the registered variants.

The table shows name, family, backends, default tolerance and the first sentence of the doc; with
``--family`` (or ``--params``) each variant's inputs (with their shapes) and the parameters it
honours follow: its own with defaults and help, then, on one line, the core knobs it shares with
``sdpa`` (same meaning and default; ``refattn list --family core`` explains them).

``--json`` prints (stable; new keys may be added, none removed)::

    {"refattn": "0.1.0",
     "variants": [{"name": "sdpa", "family": "core", "aliases": [], "doc": "...", "citation": "...",
                   "backends": ["numpy", "numba"], "tolerance": 1e-12, "inputs": ["q", "k", "v"],
                   "input_shapes": {"q": "(B, Hq, Sq, D)", "k": "(B, Hkv, Sk, D)", ...},
                   "outputs": ["out", "lse"],
                   "has_backward": true, "default_shape": [B, Hq, Sq, Sk, D, Hkv],
                   "parameters": [{"name": "scale", "default": null, "help": "..."}, ...]}, ...]}

A default that JSON cannot hold is given as its ``repr``.
"""

from __future__ import annotations

import click

from refattn import __version__, variants
from refattn.errors import ParameterError
from .options import dumps, json_option, one_line_errors


def first_sentence(doc: str, width: int = 72) -> str:
    line = " ".join(doc.split())
    end = line.find(". ")
    line = line if end < 0 else line[: end + 1]
    return line if len(line) <= width else line[: width - 3].rstrip() + "..."


def describe(var) -> dict:
    """The JSON record of one variant (the schema in the module docstring)."""
    return {"name": var.name, "family": var.family, "aliases": list(var.aliases), "doc": var.doc,
            "citation": var.citation, "backends": list(var.backends), "tolerance": var.tolerance,
            "inputs": list(var.inputs), "input_shapes": dict(var.input_shapes),
            "outputs": list(var.outputs), "has_backward": var.backward is not None,
            "default_shape": list(var.default_shape),
            "parameters": [{"name": n, "default": d, "help": h} for n, d, h in var.parameters()]}


def table(rows, headers) -> str:
    """A plain text table, columns padded to their widest cell."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


@click.command("list")
@click.option("--family", "-f", metavar="FAMILY", default=None,
              help="Only this family (core, position, kvcache, sparse, ...). Default: all.")
@click.option("--params", "show_params", is_flag=True, default=False,
              help="Also list each variant's parameters (implied by --family).")
@json_option
@one_line_errors
def command(family, show_params, as_json):
    """List the registered attention variants."""
    found = variants.list(family)
    if family is not None and not found:
        known = sorted({v.family for v in variants.list()})
        raise ParameterError(f"--family: expected one of {', '.join(known)}, got {family!r}")
    if as_json:
        click.echo(dumps({"refattn": __version__, "variants": [describe(v) for v in found]}))
        return
    rows = [(v.name, v.family, ",".join(v.backends), f"{v.tolerance:g}", first_sentence(v.doc))
            for v in found]
    click.echo(table(rows, ("variant", "family", "backends", "tolerance", "description")))
    if show_params or family is not None:
        for v in found:
            own, shared = split_core(v)
            click.echo(f"\n{v.name} inputs: " + ", ".join(f"{n} {s}" for n, s in v.input_shapes.items()))
            if own:
                click.echo(table([(n, repr(d), h) for n, d, h in own], ("name", "default", "help")))
            if shared:
                click.echo("core knobs (as sdpa): " + ", ".join(n for n, _, _ in shared))


def split_core(var) -> tuple:
    """``(own, shared)``: the variant's parameters, and those it shares with ``sdpa`` (same name
    and default), which ``refattn list`` shows on one line for every variant but sdpa itself."""
    from refattn.variants.core import CoreParams
    import dataclasses

    core = {f.name: f.default for f in dataclasses.fields(CoreParams)}
    params = var.parameters()
    if var.name == "sdpa":
        return params, []
    shared = [(n, d, h) for n, d, h in params if n in core and _same(core[n], d)]
    return [p for p in params if p not in shared], shared


def _same(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (TypeError, ValueError):
        return False
