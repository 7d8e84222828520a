#!/usr/bin/env bash
# The one prepared GPU check for the cupy backend (issue 19): install, compile, golden verify,
# the GPU tests, the benchmark against PyTorch's CUDA SDPA, then one summary block.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
#
# Made for a machine with Python 3.12, cupy-cuda13x, numba and torch and no package registry: the
# project is installed with --no-deps --no-build-isolation. pytest and Hypothesis may be missing:
# the GPU tests run under plain pytest (--noconftest: the conftest only loads Hypothesis profiles)
# when pytest is there, else through `python tests/cupy_cases.py`, which needs neither.
# Every step is time-capped and the whole run keeps to a budget of BUDGET seconds (default 360):
# a step that would start past it is skipped and says so. Results go to $OUT (default: a new
# temporary directory): summary.txt, environment.txt, and per step NAME.out (stdout: the JSON of
# the JSON-writing steps) and NAME.err (stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BUDGET="${BUDGET:-360}"
PY="${PYTHON:-python3}"
T0=$(date +%s)
STATUS=()

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# step NAME CAP CMD...: run CMD with a time cap of min(CAP, budget left); $OUT/NAME.out, NAME.err
step() {
  local name="$1" cap="$2"; shift 2
  local remaining; remaining=$(left)
  if (( remaining < 10 )); then
    STATUS+=("$name: SKIPPED (budget of ${BUDGET}s spent)"); echo "== $name: skipped, budget spent"
    return 0
  fi
  (( cap > remaining )) && cap=$remaining
  echo "== $name (cap ${cap}s)"
  local t=$(date +%s) rc=0
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
  local dt=$(( $(date +%s) - t ))
  tail -n 3 "$OUT/$name.err" | sed 's/^/   err: /'
  tail -n 4 "$OUT/$name.out" | sed 's/^/   out: /'
  if (( rc == 0 )); then STATUS+=("$name: ok (${dt}s)")
  elif (( rc == 124 || rc == 137 )); then STATUS+=("$name: TIMED OUT after ${cap}s")
  else STATUS+=("$name: FAILED rc=$rc (${dt}s)"); fi
  return 0
}

{
  echo "date: $(date -u +%FT%TZ)"; nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
  "$PY" --version
  "$PY" - <<'PYEOF'
import importlib
for m in ("numpy", "cupy", "torch", "numba", "pytest", "hypothesis"):
    try:
        print(f"{m}: {importlib.import_module(m).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{m}: missing ({type(exc).__name__})")
PYEOF
} > "$OUT/environment.txt" 2>&1 || true
cat "$OUT/environment.txt"

step install 120 "$PY" -m pip install --no-deps --no-build-isolation -e .
if ! (cd "$OUT" && "$PY" -c "import refattn.backends.cupy_, refattn.cli.main, refattn.golden") 2>/dev/null; then
  # No build tooling there (setuptools/wheel): mirror setup.cfg's package_dir with symlinks instead.
  SITE="$OUT/site"
  mkdir -p "$SITE/refattn"
  for f in refattn/*; do ln -sfn "$PWD/$f" "$SITE/refattn/$(basename "$f")"; done
  ln -sfn "$PWD/backends" "$SITE/refattn/backends"
  ln -sfn "$PWD/cli" "$SITE/refattn/cli"
  ln -sfn "$PWD/golden" "$SITE/refattn/golden"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  STATUS+=("install: used PYTHONPATH=$SITE (symlinks mirroring setup.cfg's package_dir)")
fi
step compile 240 "$PY" -c "
import time
from refattn import backends
be = backends.get('cupy')
print('device:', be.device_name)
print('compile+load seconds:', round(be.warm(), 1))
"
step golden 150 "$PY" -m refattn.cli.main golden verify --backend cupy --json

# The headline benchmark: forward, both dtypes, causal and not, N = 16384.
step bench16k 120 "$PY" -m refattn.cli.main bench --backend cupy --shape 1,16,16384,128 \
  --dtype both --causal both --repeats 2 --no-backward --json

if "$PY" -c "import pytest" 2>/dev/null; then
  step gputests 150 "$PY" -m pytest -q --noconftest -p no:cacheprovider -o addopts="" \
    tests/test_cupy_gpu.py
else
  step gputests 150 "$PY" tests/cupy_cases.py
fi

# N = 65536 float64 causal forward (PyTorch's MATH path is expected to run out of memory).
step bench64k 120 "$PY" -m refattn.cli.main bench --backend cupy --shape 1,16,65536,128 \
  --dtype float64 --causal yes --repeats 1 --no-backward --json

# N = 1M (H=8, D=64) float64 causal only if the 64K run projects under 90 s: same kernel, FLOPs
# scale by (2**20 / 2**16)**2 * (8 * 64) / (16 * 128) = 64.
PROJ=$("$PY" - "$OUT/bench64k.out" <<'PYEOF' || echo "none"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
    sec = [r["seconds"] for r in rows if r["impl"] == "cupy" and r["seconds"]][0]
    print(f"{sec * 64:.1f}")
except Exception:  # noqa: BLE001
    print("none")
PYEOF
)
if [[ "$PROJ" != "none" ]] && "$PY" -c "import sys; sys.exit(0 if float('$PROJ') < 90 else 1)"; then
  step bench1m 150 "$PY" -m refattn.cli.main bench --backend cupy --shape 1,8,1048576,64 \
    --dtype float64 --causal yes --repeats 1 --no-backward --json
else
  STATUS+=("bench1m: not run (the 64K run projects ${PROJ} s for 1M; the limit is 90 s)")
fi

# The backward, last: float64 and float32 at N = 16384.
step bwd16k 120 "$PY" -m refattn.cli.main bench --backend cupy --shape 1,16,16384,128 \
  --dtype both --causal both --repeats 1 --json

# -- one summary block --------------------------------------------------------------------------
"$PY" - "$OUT" "$(( $(date +%s) - T0 ))" "${STATUS[@]}" > "$OUT/summary.txt" <<'PYEOF' || true
import json, os, sys
out, total, status = sys.argv[1], sys.argv[2], sys.argv[3:]
def load(name):
    try:
        with open(os.path.join(out, name + ".out")) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001
        return None
print("=" * 78)
print("refattn cupy GPU check -- summary")
env = open(os.path.join(out, "environment.txt")).read().strip().splitlines()
print("\n".join("  " + ln for ln in env))
print(f"total {total}s")
for s in status:
    print("  step", s)
g = load("golden")
if g:
    avail = g.get("backends", {}).get("cupy", {})
    if not avail.get("available", True):
        print(f"golden verify: cupy backend unavailable: {avail.get('reason')}")
    rows = [r for r in g["results"] if r["backend"] == "cupy"]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    worst = max((r["normwise_rel"] for r in rows if isinstance(r.get("normwise_rel"), float)), default=None)
    print(f"golden verify --backend cupy: {counts}  worst normwise rel {worst}")
    for r in rows:
        if r["status"] not in ("PASS", "SKIPPED"):
            print(f"  {r['status']} {r['case']}: {r.get('reason') or r.get('normwise_rel')}")
try:
    tail = open(os.path.join(out, "gputests.out")).read().strip().splitlines()[-1]
    print("GPU tests:", tail)
except Exception:  # noqa: BLE001
    print("GPU tests: no log")
for name in ("bench16k", "bench64k", "bench1m", "bwd16k"):
    b = load(name)
    if not b:
        continue
    s = b["shape"]
    print(f"{name}: {b['gpu']['name']}  B={s['B']} H={s['H']} N={s['N']} D={s['D']}  torch {b['torch']}")
    for r in b["rows"]:
        impl = r["impl"] + (f"({r['peer_backend']})" if r["peer_backend"] else "")
        if r["error"]:
            print(f"  {r['dtype']:8} {r['mask']:6} {r['pass']:8} {impl:26} {r['error']}")
        else:
            vs = "" if r["vs_torch"] is None else f"  {r['vs_torch']:.2f}x torch"
            print(f"  {r['dtype']:8} {r['mask']:6} {r['pass']:8} {impl:26} {r['seconds']:9.4f}s "
                  f"{r['tflops']:7.2f} TFLOP/s{vs}")
    m = b["memory"]
    print(f"  memory: cupy pool {m['cupy_pool_bytes'] / 2**30:.2f} GiB, torch peak "
          f"{(m['torch_peak_bytes'] or 0) / 2**30:.2f} GiB")
print("=" * 78)
PYEOF
cat "$OUT/summary.txt"
echo "results in $OUT"
