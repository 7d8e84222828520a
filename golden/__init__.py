"""Golden files: pinned float64 answers for the cases of :mod:`refattn.golden.cases`.

The files ship inside the package (``refattn/golden/*.npz`` and ``manifest.json``) and are found
with :mod:`importlib.resources`, so an installed wheel finds its own copies, not a checkout's.

File format
-----------
``<case>.npz`` is a zip of ``.npy`` arrays (never object arrays; read with ``allow_pickle=False``)
written deterministically (sorted keys, fixed timestamps) so an unchanged case keeps its sha256.
Keys: ``input.<name>`` (the variant's inputs), ``param.<name>`` (made array parameters),
``output.out``, ``output.lse`` and, for cases with gradients, ``grad.dout`` (the upstream gradient),
``grad.dq``, ``grad.dk``, ``grad.dv``, ``grad.extras.<name>``.

``manifest.json``::

    {"format": 1,
     "cases": {"<case>": {"file": "<case>.npz", "sha256": "...", "variant": "sdpa",
                          "params": {...scalars...}, "arrays": {"mask": "empty_row"},
                          "shape": [B, Hq, Sq, Sk, D, Hkv], "seed": 0, "grads": true,
                          "tolerance": 1e-12, "refattn": "0.1.0", "numpy": "2.4.6",
                          "platform": {...}}}}

``platform`` records the machine, the numpy version and the SIMD level of numpy's math functions:
float64 results are bit-for-bit reproducible on the same platform; across platforms they agree to
the case's tolerance (which ``refattn golden verify`` checks).

Notes
-----
A changed golden file is a reviewed event. ``CHANGES.json`` (shipped beside the files) keeps the
notes: ``{"format": 1, "notes": [{"date": "2026-11-30", "refattn": "0.2.0", "note": "why",
"cases": {"<case>": ["output.out: max abs 2.2e-16, normwise rel 1.1e-16", ...]}}, ...]}``, oldest
first. :func:`regen` refuses to change an existing file without a note (nothing is written then),
records what moved in each case under it, and records new cases too; ``refattn golden verify``
prints the latest note of each case it reports.

Loading reports a problem as one of :class:`GoldenMissing` (no manifest entry or no file),
:class:`GoldenTampered` (the file's sha256 differs from the manifest) or :class:`GoldenCorrupt` (the
file or manifest cannot be read safely, e.g. a pickled array); each has a ``status`` word.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform as _platform
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from refattn.errors import GoldenError

MANIFEST = "manifest.json"
NOTES = "CHANGES.json"
FORMAT = 1
#: set (tests, ``regen --dir``) to read and write golden files somewhere else than the package
_DIRECTORY: Optional[Path] = None


class GoldenMissing(GoldenError):
    status = "MISSING"


class GoldenTampered(GoldenError):
    status = "TAMPERED"


class GoldenCorrupt(GoldenError):
    status = "CORRUPT"


def directory():
    """Where golden files are read from: the installed package's data unless overridden."""
    if _DIRECTORY is not None:
        return Path(_DIRECTORY)
    return resources.files(__name__)


def platform_fingerprint() -> dict:
    """What float64 bit-for-bit reproducibility depends on (machine, numpy, its SIMD math level)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    simd = next((f for f in ("AVX512_SKX", "AVX2", "ASIMD", "SSE2") if feats.get(f)), "none")
    return {"machine": _platform.machine(), "numpy": np.__version__, "simd": simd}


# -- manifest ------------------------------------------------------------------------------------
def read_manifest(where=None) -> dict:
    """The manifest's ``cases`` dict; ``{}`` when there is no manifest; GoldenCorrupt if unreadable."""
    entry = (where or directory()) / MANIFEST
    if not entry.is_file():
        return {}
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
        cases = data["cases"]
        if data.get("format") != FORMAT or not isinstance(cases, dict):
            raise ValueError(f"format {data.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise GoldenCorrupt(f"{MANIFEST}: expected a refattn golden manifest (format {FORMAT}), "
                            f"got an unreadable file ({exc})") from exc
    return cases


def write_manifest(cases: dict, where: Path):
    text = json.dumps({"format": FORMAT, "cases": dict(sorted(cases.items()))}, indent=1,
                      sort_keys=True)
    _atomic_write(Path(where) / MANIFEST, (text + "\n").encode("utf-8"))


# -- npz files -----------------------------------------------------------------------------------
def npz_bytes(arrays: dict) -> bytes:
    """A deterministic ``.npz``: sorted keys, fixed timestamps, no compression, no pickles."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            a = np.asarray(arrays[key])
            a = a if a.ndim == 0 else np.ascontiguousarray(a)  # it would make a 0-d array 1-d
            if a.dtype.hasobject:
                raise GoldenCorrupt(f"{key}: expected a numeric or boolean array, got dtype object")
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    return buf.getvalue()


def read_npz(data: bytes, what: str) -> dict:
    """Every array of an ``.npz`` given as bytes; GoldenCorrupt for anything unsafe or unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise GoldenCorrupt(f"{what}: expected an .npz of plain arrays (no pickles), "
                            f"got an unreadable file ({type(exc).__name__}: {exc})") from exc


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Stored:
    """One golden case as stored: its manifest ``entry``, its ``arrays`` and where it came from."""

    name: str
    entry: dict
    arrays: dict
    path: str

    def group(self, prefix: str) -> dict:
        """Arrays under ``prefix.`` with the prefix removed (``group("input")`` -> ``{"q": ...}``)."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.arrays.items() if k.startswith(p)}


def load(name: str, manifest: Optional[dict] = None, where=None) -> Stored:
    """The stored case ``name``, checked against the manifest (sha256) before it is parsed."""
    where = where or directory()
    manifest = read_manifest(where) if manifest is None else manifest
    entry = manifest.get(name)
    if entry is None:
        raise GoldenMissing(f"{name}: no entry in {MANIFEST}; run 'refattn golden regen --case {name}'")
    if not isinstance(entry, dict):
        raise GoldenCorrupt(f"{name}: expected a record (file, sha256, ...) in {MANIFEST}, got a "
                            f"{type(entry).__name__}")
    fname = entry.get("file")
    if fname != f"{name}.npz":
        raise GoldenTampered(f"{name}: manifest names file {fname!r}, expected {name + '.npz'!r}")
    node = where / fname
    if not node.is_file():
        raise GoldenMissing(f"{name}: file {fname} is missing from {where}")
    data = node.read_bytes()
    if sha256(data) != entry.get("sha256"):
        raise GoldenTampered(f"{name}: {fname} has sha256 {sha256(data)[:12]}..., the manifest says "
                             f"{str(entry.get('sha256'))[:12]}...")
    arrays = read_npz(data, fname)
    if "output.out" not in arrays or not any(k.startswith("input.") for k in arrays):
        raise GoldenCorrupt(f"{name}: {fname} lacks the keys input.* and output.out")
    return Stored(name=name, entry=entry, arrays=arrays, path=str(node))


# -- computing a case ----------------------------------------------------------------------------
def evaluate(case, backend: str, inputs: dict, params: dict, dout=None) -> dict:
    """Outputs of ``case``'s variant on ``backend``: ``{"output.out", "output.lse", "grad.*"}``.

    ``inputs`` and ``params`` are the built (or stored) arrays; gradients are computed when ``dout``
    is given. Runs through the one pipeline (:func:`refattn.pipeline.run`): ``grad.d<input>`` for
    the variant's inputs (``grad.dq``, ``grad.dk``, ``grad.dv`` for attention variants) and
    ``grad.extras.<name>`` for the gradients of other inputs and learnable parameters.
    """
    from refattn import pipeline

    res = pipeline.run(case.variant, backend, dict(inputs), params, dout=dout)
    result = {f"output.{n}": a for n, a in res.outputs.items()}
    if res.grads is not None:
        var = res.variant
        direct = var.inputs[:3] if var.on_qkv else var.inputs
        for n, g in res.grads.items():
            result[f"grad.d{n}" if n in direct else f"grad.extras.{n}"] = g
    return {k: np.asarray(v) for k, v in result.items()}


def stored_inputs(case, stored: Stored):
    """``(inputs, params, dout)`` of a stored case: arrays from the file, scalars from the case."""
    params = dict(case.params)
    params.update(stored.group("param"))
    return stored.group("input"), params, stored.arrays.get("grad.dout")


def case_entry(case) -> dict:
    """The manifest fields that describe ``case`` (JSON-normalised, to compare with a stored one)."""
    from refattn import variants

    tol = case.tolerance if case.tolerance is not None else variants.get(case.variant).tolerance
    return json.loads(json.dumps({"variant": case.variant, "params": case.params,
                                  "arrays": case.arrays, "shape": list(case.shape),
                                  "seed": case.seed, "grads": case.grads, "tolerance": tol}))


def generate(case) -> dict:
    """Every array of ``case``'s golden file, computed with the numpy backend in float64."""
    from refattn.golden.cases import build

    built = build(case)
    arrays = {f"input.{n}": np.asarray(a) for n, a in built.inputs.items()}
    arrays.update({f"param.{n}": built.params[n] for n in case.arrays})
    outputs = evaluate(case, "numpy", built.inputs, built.params)
    if case.grads:
        dout = built.rng.standard_normal(outputs["output.out"].shape)
        outputs = evaluate(case, "numpy", built.inputs, built.params, dout=dout)
        arrays["grad.dout"] = dout
    arrays.update(outputs)
    return arrays


def moved(old: dict, new: dict) -> list:
    """What changed between two versions of a file: ``[(key, what)]``, empty when identical; the
    amounts are :func:`refattn.numerics.metrics` of the new array against the old one."""
    from refattn.numerics import metrics

    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append((key, "added"))
        elif key not in new:
            changes.append((key, "removed"))
        elif old[key].shape != new[key].shape or old[key].dtype != new[key].dtype:
            changes.append((key, f"shape/dtype {old[key].shape} {old[key].dtype} -> "
                                 f"{new[key].shape} {new[key].dtype}"))
        elif not np.array_equal(old[key], new[key], equal_nan=old[key].dtype.kind == "f"):
            m = metrics(new[key].astype(np.float64), old[key].astype(np.float64), name=key)
            extra = (f", {m['nonfinite_mismatch']} non-finite entries changed"
                     if m["nonfinite_mismatch"] else "")
            changes.append((key, f"max abs {m['max_abs']:.3g}, normwise rel {m['normwise_rel']:.3g}{extra}"))
    return changes


def regen(cases: dict, where=None, note: Optional[str] = None) -> list:
    """Rewrite the files of ``cases`` and their manifest entries, keeping every other entry.

    Returns ``[(name, status, changes)]`` with status ``new``, ``unchanged`` or ``changed`` and
    ``changes`` as :func:`moved` gives them (a previous file that cannot be read counts as new).
    Every case is computed before anything is written: when an existing file would change and
    ``note`` is empty, a :class:`GoldenError` naming ``note`` says what would move and nothing is
    written. The note (``"added"`` for new cases without one) is appended to ``CHANGES.json``
    with what moved. The manifest is re-read and replaced atomically under a lock at the end, so
    regenerating different cases at the same time keeps both.
    """
    from refattn import __version__

    where = Path(where) if where is not None else Path(str(directory()))
    where.mkdir(parents=True, exist_ok=True)
    report, entries, files = [], {}, {}
    for name, case in cases.items():
        arrays = generate(case)
        data = npz_bytes(arrays)
        path = where / f"{name}.npz"
        old = None
        if path.is_file():
            try:
                old = read_npz(path.read_bytes(), path.name)
            except GoldenCorrupt:
                old = None
        files[path] = data
        entries[name] = {"file": path.name, "sha256": sha256(data), **case_entry(case),
                         "refattn": __version__, "numpy": np.__version__,
                         "platform": platform_fingerprint()}
        if old is None:
            report.append((name, "new", []))
        else:
            changes = moved(old, arrays)
            report.append((name, "changed" if changes else "unchanged", changes))
    changed = [(n, c) for n, status, c in report if status == "changed"]
    note = (note or "").strip()
    if changed and not note:
        first = "; ".join(f"{n}: {k} {w}" for n, c in changed[:3] for k, w in c[:1])
        raise GoldenError(f"note: expected a note saying why {len(changed)} golden file(s) change "
                          f"(a changed golden file is a reviewed event), got none; what would "
                          f"move: {first}{' ...' if len(changed) > 3 else ''}; nothing was written")
    for path, data in files.items():
        _atomic_write(path, data)
    recorded = {n: [f"{k}: {w}" for k, w in c] for n, status, c in report if status == "changed"}
    recorded.update({n: ["added"] for n, status, _ in report if status == "new"})
    with _locked(where):
        try:
            manifest = read_manifest(where)
        except GoldenCorrupt:
            manifest = {}
        manifest.update(entries)
        write_manifest(manifest, where)
        if recorded:
            _add_note(where, note or "added", recorded, __version__)
    return report


def read_notes(where=None) -> list:
    """The notes of ``CHANGES.json`` (module docstring), oldest first; ``[]`` without the file."""
    entry = (where or directory()) / NOTES
    if not entry.is_file():
        return []
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
        notes = data["notes"]
        if data.get("format") != FORMAT or not isinstance(notes, list):
            raise ValueError(f"format {data.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise GoldenCorrupt(f"{NOTES}: expected refattn golden notes (format {FORMAT}), got an "
                            f"unreadable file ({exc})") from exc
    return notes


def latest_notes(where=None) -> dict:
    """``{case: the latest note naming it}`` (each note a dict: date, refattn, note, cases)."""
    latest = {}
    for note in read_notes(where):
        for case in note.get("cases", {}):
            latest[case] = note
    return latest


def _add_note(where: Path, text: str, cases: dict, version: str):
    import datetime
    notes = read_notes(where) if (Path(where) / NOTES).is_file() else []
    notes.append({"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                  "refattn": version, "note": text, "cases": dict(sorted(cases.items()))})
    text = json.dumps({"format": FORMAT, "notes": notes}, indent=1, sort_keys=True)
    _atomic_write(Path(where) / NOTES, (text + "\n").encode("utf-8"))


def _atomic_write(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(where: Path):
    """An exclusive lock for the manifest in ``where`` (a file in the temporary directory, so
    nothing is left in the golden directory) where the platform has ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no concurrent regen support
        yield
        return
    key = hashlib.sha256(str(Path(where).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"refattn-golden-{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
