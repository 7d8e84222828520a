"""Options and parsers shared by the subcommands (rasterio style: one place for the common flags).

Every parser raises a :mod:`refattn.errors` exception; :func:`one_line_errors` turns those into one
line on stderr and exit status 2, so a user mistake never shows a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings

import click

from refattn.errors import ParameterError, RefattnError, ShapeError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

json_option = click.option("--json", "as_json", is_flag=True, default=False,
                           help="Print stable, documented JSON instead of a table. Default: a table.")
backend_option = click.option("--backend", "-b", metavar="NAME", default=None,
                              help="Backend to run (numpy, numba, cupy). Default: the fastest "
                                   "available that the variant supports.")
case_option = click.option("--case", "case_glob", metavar="GLOB", default=None,
                           help="Only golden cases whose name matches this shell glob. Default: all.")


def _warning_line(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {message}", err=True)


class _OncePerCommand:
    """``showwarning`` printing each distinct message once per command (the run under test and
    the reference may meet the same condition, e.g. BigBird's short-sequence fallback)."""

    def __init__(self):
        self.seen = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in self.seen:
            self.seen.add(text)
            _warning_line(message, category, filename, lineno, file, line)


def one_line_errors(f):
    """Report :class:`RefattnError` as ``Error: <message>`` on stderr and exit 2, Ctrl-C as
    ``Interrupted`` and exit 130; warnings are printed as one ``Warning: <message>`` line each."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.showwarning = _OncePerCommand()
            try:
                return f(*args, **kwargs)
            except RefattnError as exc:  # one line even when a user's exception spans several
                text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
                click.echo(f"Error: {text}", err=True)
                raise click.exceptions.Exit(EXIT_USAGE) from None
            except KeyboardInterrupt:  # Ctrl-C: the shell's convention, never the FAIL code
                click.echo("Interrupted", err=True)
                raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    return wrapper


def jsonable(value):
    """``value`` as strict JSON data: numpy scalars and arrays as numbers and lists, non-finite
    floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``, anything else unknown as its ``repr``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def dumps(obj) -> str:
    """Strict JSON (no NaN/Infinity literals), indented."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


# -- --shape --------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple:
    """``B,H,S,D`` -> ``(B, H, S, S, D, H)``; ``B,Hq,Sq,Sk,D,Hkv`` as given; positive integers."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = None
    if dims is None or len(dims) not in (4, 6) or min(dims) < 1:
        raise ShapeError(f"--shape: expected 4 or 6 positive integers B,H,S,D or B,Hq,Sq,Sk,D,Hkv, "
                         f"got {text!r}")
    if len(dims) == 4:
        b, h, s, d = dims
        return (b, h, s, s, d, h)
    return tuple(dims)


# -- --param k=v ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Made:
    """An array parameter to be made from the seed (``--param sinks=random``)."""

    how: str


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _to_bool(text):
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("a boolean (true/false)")


def _to_int(text):
    try:
        return int(text)
    except ValueError:
        raise ValueError("an integer") from None


def _to_float(text):
    try:
        return float(text)
    except ValueError:
        raise ValueError("a number") from None


def _to_tuple(text):
    try:
        return tuple(_to_int(p) if p.strip().lstrip("+-").isdigit() else float(p)
                     for p in text.split(","))
    except ValueError:
        raise ValueError("comma-separated numbers, e.g. 128,0") from None


def _to_any(text):
    """Untyped fields: booleans, None, integers, numbers, comma tuples, else the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if "," in text:
        return _to_tuple(text)
    return text


def _converter(field: dataclasses.Field):
    """The parser for a dataclass field, from its annotation (string or type) and its default."""
    ann = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    ann = str(ann).replace("typing.", "")
    inner = ann[len("Optional["):-1] if ann.startswith("Optional[") else ann
    table = {"bool": _to_bool, "int": _to_int, "float": _to_float, "tuple": _to_tuple, "str": str}
    if inner in table:
        return table[inner]
    if inner != "Any" and isinstance(field.default, bool):
        return _to_bool
    return _to_any


def parse_params(var, items, array_names) -> dict:
    """``--param k=v`` items -> keyword values for ``var``'s parameter dataclass.

    Values are parsed by the field's type; ``none`` gives None for optional fields. Array parameters
    (``array_names``: those a maker can make) accept only a maker's name, e.g. ``random`` or, for
    ``alibi_slopes``, ``alibi``; they come back as :class:`Made` records.
    """
    fields = {f.name: f for f in dataclasses.fields(var.params) if f.name in var.fields()}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ParameterError(f"--param: expected name=value, got {item!r}")
        if name in out:
            raise ParameterError(f"--param {name}: given twice ({name}={out[name]!r} and {item!r}); "
                                 f"give it once")
        if name not in fields:
            raise ParameterError(f"--param {name}: not a parameter of variant {var.name!r}; expected "
                                 f"one of {', '.join(sorted(fields))}")
        if name in array_names:
            out[name] = Made(text.strip())
            continue
        if text.strip().lower() == "none" and fields[name].default is None:
            out[name] = None
            continue
        try:
            out[name] = _converter(fields[name])(text.strip())
        except ValueError as exc:
            raise ParameterError(f"--param {name}: expected {exc}, got {text!r}") from None
    return out


def param_option(f):
    return click.option("--param", "-p", "params", metavar="NAME=VALUE", multiple=True,
                        help="A variant parameter (repeatable), parsed by its type: causal=true, "
                             "causal=top_left, window=128,0, softcap=30; array parameters take "
                             "'random' (made from --seed), alibi_slopes also 'alibi' (the paper's). "
                             "Default: the variant's defaults (refattn list --family F).")(f)
