"""``refattn compare --hf-config config.json --layer N [--seq S]``: check one layer of a transformers
model against the float64 oracle.

The layer's attention module is built from the config (:func:`refattn.hf.build_layer`, every weight
drawn from ``--seed``; nothing is downloaded), run in float64 eager mode on hidden states of shape
``(2, S, hidden_size)`` drawn from the same seed, captured where it attends and compared with the
layer's variant (:func:`refattn.hf.check_module`; normwise relative tolerance ``--tolerance``,
default 1e-10). ``--grad`` also compares the input gradients. The table lists each array; on FAIL
the worst ``(b, h, i, j)`` and the stage where the module departs from its config (scale, mask,
RoPE). Peer quirks found on the way are printed as ``Warning:`` lines on stderr.

Exit status as ``refattn compare``: 0 PASS, 1 FAIL, 2 usage or input error (a missing or invalid
file, an unsupported model type or config option, a layer out of range, torch/transformers absent).

The JSON record (``--json``, schema ``refattn.compare.hf/1``): ``model_type``, ``layer``,
``layer_type``, ``variant``, ``params`` (the variant's parameters from the config), ``seq``,
``seed``, ``tolerance``, ``arrays`` (per array: the metrics of :func:`refattn.numerics.metrics` and
``verdict``), ``verdict``, ``worst``, ``stages``, ``warnings``, ``notes``.
"""

from __future__ import annotations

import json
import os

import click

from refattn.errors import InputFileError, ParameterError

SCHEMA = "refattn.compare.hf/1"

#: options of ``refattn compare`` that --hf-config replaces (given together: a usage error)
EXCLUSIVE = ("variant", "case", "shape", "params", "impl_spec", "outputs", "dtype", "backend", "adapter")


def hf_options(f):
    """The options of this front end, added to ``refattn compare`` (click decorators)."""
    f = click.option("--tolerance", "hf_tolerance", metavar="TOL", type=float, default=None,
                     help="With --hf-config: normwise relative error allowed per array. Default: 1e-10.")(f)
    f = click.option("--seq", "hf_seq", metavar="S", type=int, default=None,
                     help="With --hf-config: sequence length of the hidden states. Default: 16.")(f)
    f = click.option("--layer", "hf_layer", metavar="N", type=int, default=None,
                     help="With --hf-config: the layer to check (0-based). Default: 0.")(f)
    f = click.option("--hf-config", "hf_config", metavar="CONFIG.json", default=None,
                     help="Check one layer of a transformers model built from this config with random "
                          "weights (needs refattn[peers]; nothing is downloaded). Default: none.")(f)
    return f


def read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise InputFileError(f"--hf-config: expected a config.json file, got {path!r} (no such file)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"--hf-config: expected a JSON object in {path!r}, got unreadable JSON "
                             f"({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(f"--hf-config: expected a JSON object in {path!r}, got {type(data).__name__}")
    return data


def hf_given(hf_layer, hf_seq, hf_tolerance) -> list:
    return [n for n, v in (("--layer", hf_layer), ("--seq", hf_seq), ("--tolerance", hf_tolerance))
            if v is not None]


def run_hf(path: str, layer, seq, seed, tolerance, grad: bool, others: dict) -> dict:
    """The JSON-able result of checking layer ``layer`` of the model in ``path``."""
    import numpy as np

    given = [n for n in EXCLUSIVE if others.get(n) not in (None, (), False)]
    if given:
        flag = "--" + given[0].replace("_spec", "").replace("params", "param").replace("_", "-")
        raise ParameterError(f"{flag}: not used with --hf-config (the layer's variant, parameters, inputs "
                             f"and the module under test come from the config)")
    from refattn import hf

    layer = 0 if layer is None else layer
    seq = 16 if seq is None else seq
    seed = 0 if seed is None else seed
    if seq < 1:
        raise ParameterError(f"--seq: expected a sequence length >= 1, got {seq}")
    config = read_config(path)
    try:
        module = hf.build_layer(config, layer, seed=seed)
    except ParameterError as exc:
        if str(exc).startswith("layer_idx:"):
            raise ParameterError("--layer:" + str(exc)[len("layer_idx:"):]) from None
        raise
    d = int(module.config.hidden_size)
    x = np.random.default_rng(seed).standard_normal((2, seq, d))
    kw = {} if tolerance is None else {"tolerance": tolerance}
    res = hf.check_module(module, x, grad=grad, seed=seed, **kw)
    s = res.spec
    return {"schema": SCHEMA, "config": path, "model_type": s.model_type, "layer": s.layer_idx,
            "layer_type": s.layer_type, "variant": s.variant, "params": s.params, "seq": seq, "seed": seed,
            "grad": grad, "tolerance": res.tolerance, "arrays": res.results, "verdict": res.verdict,
            "worst": res.worst, "stages": res.stages, "warnings": res.warnings, "notes": list(s.notes),
            "message": res.message}


def render_hf(result: dict) -> str:
    head = (f"refattn compare --hf-config {result['config']}: {result['model_type']} layer "
            f"{result['layer']}" + (f" ({result['layer_type']})" if result["layer_type"] else "")
            + f", seq {result['seq']}, seed {result['seed']}")
    body = [line for line in result["message"].splitlines() if not line.startswith("warning: ")]
    return "\n".join([head] + [f"  note: {n}" for n in result["notes"]] + body)
