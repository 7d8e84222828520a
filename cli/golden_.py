"""``refattn golden regen|verify``: the pinned float64 answers (see :mod:`refattn.golden`).

``verify`` recomputes every stored case on every requested backend from the *stored* inputs and
compares every stored array (out, lse and, where pinned, dq/dk/dv and the extras' gradients) with
the rule of ``refattn compare``: identical non-finite entries and normwise relative error at most
the case's tolerance. A file that is missing, whose sha256 differs from the manifest, or that cannot
be read safely is reported MISSING, TAMPERED or CORRUPT; a manifest entry that disagrees with the
case's definition (variant, params, shape, seed, ...) is STALE; an entry without a definition is
ORPHAN; a backend that raises an error on a stored case is ERROR. Any of these, or a FAIL, exits
1. Backends that are not installed, or that the variant does not support, are reported as skipped
with the reason.

``verify --json`` prints (stable; keys may be added)::

    {"refattn": "0.1.0", "directory": "...",
     "backends": {"numpy": {"available": true, "reason": null}, ...},
     "results": [{"case": "core_plain", "backend": "numpy",
                  "status": "PASS" | "FAIL" | "ERROR" | "SKIPPED" | "MISSING" | "TAMPERED"
                            | "CORRUPT" | "STALE" | "ORPHAN",
                  "reason": str | null, "max_abs": float | null, "normwise_rel": float | null,
                  "tolerance": float | null, "arrays": {"out": METRICS, ...},
                  "note": null | {"date": ..., "refattn": ..., "note": "...", "cases": {...}}}, ...],
     "verdict": "PASS" | "FAIL", "notes_error": null | "..."}

with ``METRICS`` as documented in :mod:`refattn.cli.compare`.

``regen`` recomputes the selected cases with the numpy backend in float64, rewrites their files and
manifest entries (other entries are kept) and prints, for each case that existed, what moved and by
how much -- a changed golden file is a reviewed event: an existing file that would change needs
``--note "why"`` (without it nothing is written), and the note, with what moved, is kept in
``CHANGES.json`` beside the files; ``verify`` prints the latest note of each case it reports.
"""

from __future__ import annotations

from pathlib import Path

import click

from refattn import __version__, backends, golden, variants
from refattn.errors import BackendUnavailable, GoldenError, ParameterError, RefattnError
from refattn.golden.cases import select
from .compare.verdict import metrics, verdict
from .list_ import table
from .options import EXIT_FAIL, EXIT_OK, case_option, dumps, json_option, one_line_errors

BROKEN = ("FAIL", "ERROR", "MISSING", "TAMPERED", "CORRUPT", "STALE", "ORPHAN")


@click.group("golden")
def command():
    """Regenerate or verify the golden files (pinned float64 answers)."""


def _cases(glob):
    cases = select(glob)
    if not cases:
        raise ParameterError(f"--case: expected a glob matching a golden case, got {glob!r} "
                             f"(cases: {', '.join(sorted(select()))})")
    return cases


# -- regen ----------------------------------------------------------------------------------------
@command.command("regen", short_help="Recompute golden files (numpy, float64); print what moved.")
@case_option
@click.option("--dir", "where", type=click.Path(file_okay=False), default=None,
              help="Write here instead of the package's golden directory.")
@click.option("--note", default=None, metavar="TEXT",
              help="Why the files change (required when an existing file would change; kept in "
                   "CHANGES.json and shown by verify). Default: none.")
@one_line_errors
def regen(case_glob, where, note):
    """Recompute cases with numpy in float64; write .npz files and the manifest; print what moved.
    A regen that changes an existing file needs --note (nothing is written without it)."""
    cases = _cases(case_glob)
    target = Path(where) if where else Path(str(golden.directory()))
    try:
        report = golden.regen(cases, target, note=note)
    except OSError as exc:
        raise ParameterError(f"--dir: cannot write golden files to {str(target)!r} "
                             f"({exc.strerror or exc})") from None
    except GoldenError as exc:
        if str(exc).startswith("note:"):
            raise ParameterError("--" + str(exc)) from None
        raise
    for name, status, changes in report:
        if status != "changed":
            click.echo(f"{name}: {status}")
            continue
        click.echo(f"{name}: changed")
        for key, what in changes:
            click.echo(f"  {key}: {what}")
    click.echo(f"wrote {len(cases)} case(s) and {golden.MANIFEST} in {target}")


# -- verify ---------------------------------------------------------------------------------------
def backend_status(names) -> dict:
    """``{name: (available, reason)}``; an unknown name is a usage error."""
    status = {}
    for name in names:
        if name not in backends.names():
            backends.get(name)  # raises BackendUnavailable naming the known ones
        try:
            backends.get(name)
            status[name] = (True, None)
        except BackendUnavailable as exc:
            status[name] = (False, str(exc).split(": ", 1)[-1])
    return status


def _worst(nums, key):
    """The largest value of ``key`` over the arrays' metrics; a non-finite one (a string) wins."""
    vals = [m[key] for m in nums]
    strings = [v for v in vals if isinstance(v, str)]
    return strings[0] if strings else max(vals, default=None)


def _row(case, backend, status, reason=None, tolerance=None, arrays=None):
    nums = [m for m in (arrays or {}).values() if "error" not in m]
    return {"case": case, "backend": backend, "status": status, "reason": reason,
            "max_abs": _worst(nums, "max_abs"), "normwise_rel": _worst(nums, "normwise_rel"),
            "tolerance": tolerance, "arrays": arrays or {}}


def verify_case(case, stored, status: dict) -> list:
    """Rows for one loaded case: one per backend."""
    var = variants.get(case.variant)
    tol = stored.entry["tolerance"]
    inputs, params, dout = golden.stored_inputs(case, stored)
    expected = {k.split(".", 1)[1]: v for k, v in stored.arrays.items()
                if k.startswith(("output.", "grad.")) and k != "grad.dout"}
    rows = []
    for name, (ok, why) in status.items():
        if name not in var.backends:
            rows.append(_row(case.name, name, "SKIPPED", f"variant {var.name!r} does not run on {name}"))
            continue
        if not ok:
            rows.append(_row(case.name, name, "SKIPPED", why))
            continue
        try:
            got = golden.evaluate(case, name, inputs, params, dout=dout)
        except RefattnError as exc:  # the backend rejects a stored case: a failure, not a crash
            rows.append(_row(case.name, name, "ERROR", str(exc), tol))
            continue
        actual = {k.split(".", 1)[1]: v for k, v in got.items()}
        report = metrics(actual, expected)
        rows.append(_row(case.name, name, verdict(report, tol), None, tol, report))
    return rows


def stale(case, entry) -> list:
    """Fields where the manifest entry disagrees with the case's definition."""
    want = golden.case_entry(case)
    return [k for k, v in want.items() if entry.get(k) != v]


def _status(exc) -> str:
    return getattr(exc, "status", "CORRUPT")


def verify_all(cases: dict, status: dict, orphans: bool = True) -> list:
    """Rows for every case (and, with ``orphans``, for manifest entries no case defines)."""
    try:
        manifest = golden.read_manifest()
    except GoldenError as exc:
        return [_row(n, "-", _status(exc), str(exc)) for n in cases]
    rows = []
    for name, case in cases.items():
        try:
            stored = golden.load(name, manifest)
        except GoldenError as exc:
            rows.append(_row(name, "-", _status(exc), str(exc)))
            continue
        fields = stale(case, stored.entry)
        if fields:
            rows.append(_row(name, "-", "STALE", f"manifest disagrees with the case definition on "
                                                 f"{', '.join(fields)}; run refattn golden regen"))
            continue
        rows.extend(verify_case(case, stored, status))
    for name in sorted(set(manifest) - set(select())) if orphans else ():
        rows.append(_row(name, "-", "ORPHAN", "in the manifest but no case defines it"))
    return rows


def note_lines(rows) -> list:
    """The latest note of each reported case, one line per note: ``last change (date, refattn V)
    of N cases (a, b, ...): text``."""
    by_note = {}
    for r in rows:
        n = r.get("note")
        if n is not None:
            by_note.setdefault(id(n), (n, []))
            if r["case"] not in by_note[id(n)][1]:
                by_note[id(n)][1].append(r["case"])
    lines = []
    for note, cases in by_note.values():
        named = ", ".join(cases[:4]) + (f" and {len(cases) - 4} more" if len(cases) > 4 else "")
        lines.append(f"last change ({note.get('date')}, refattn {note.get('refattn')}) of "
                     f"{len(cases)} case{'s' if len(cases) != 1 else ''} ({named}): {note.get('note')}")
    return lines


def _fmt(x):
    return "-" if x is None else (x if isinstance(x, str) else f"{x:.3g}")


@command.command("verify", short_help="Check every golden case on every backend.")
@click.option("--backend", "-b", "names", metavar="NAME", multiple=True,
              help="Backend to check (repeatable). Default: every backend refattn knows; those not "
                   "installed are reported as skipped.")
@case_option
@json_option
@one_line_errors
def verify(names, case_glob, as_json):
    """Check every golden case on every backend; exit 1 on any failure or damaged file."""
    cases = _cases(case_glob)
    status = backend_status(names or backends.names())
    rows = verify_all(cases, status, orphans=case_glob is None)
    overall = "FAIL" if any(r["status"] in BROKEN for r in rows) else "PASS"
    try:
        latest = golden.latest_notes()
    except GoldenError as exc:  # unreadable notes: say so, the verdict stands on the files
        latest, notes_error = {}, str(exc)
    else:
        notes_error = None
    for r in rows:
        r["note"] = latest.get(r["case"])
    if as_json:
        click.echo(dumps({"refattn": __version__, "directory": str(golden.directory()),
                          "backends": {n: {"available": ok, "reason": why}
                                       for n, (ok, why) in status.items()},
                          "results": rows, "verdict": overall, "notes_error": notes_error}))
    else:
        skipped = {n: why for n, (ok, why) in status.items() if not ok}
        shown = [r for r in rows if not (r["status"] == "SKIPPED" and r["backend"] in skipped)]
        click.echo(table([(r["case"], r["backend"], _fmt(r["max_abs"]), _fmt(r["normwise_rel"]),
                           _fmt(r["tolerance"]),
                           r["status"] + (f": {r['reason']}" if r["reason"] else ""))
                          for r in shown],
                         ("case", "backend", "max abs err", "normwise rel err", "tolerance", "verdict")))
        for n, why in skipped.items():
            click.echo(f"skipped backend {n}: {why}")
        for line in note_lines(rows):
            click.echo(line)
        if notes_error:
            click.echo(f"notes: {notes_error}")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS",) + BROKEN + ("SKIPPED",)}
        click.echo(f"{overall}: " + ", ".join(f"{c} {s}" for s, c in counts.items() if c))
    raise click.exceptions.Exit(EXIT_FAIL if overall == "FAIL" else EXIT_OK)
