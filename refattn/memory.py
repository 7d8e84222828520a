"""How much memory a run will hold, estimated before anything is allocated.

Every command that makes arrays from a user's sizes (``refattn compare --shape``, ``--outputs``
files, ``refattn mask --seq``, ``refattn bench --shape``) estimates the bytes first and refuses,
with the estimate and the limit in one line, when it exceeds half of the memory the system reports
available (``MemAvailable`` in ``/proc/meminfo``; elsewhere ``os.sysconf``). Half leaves room for
the interpreter, the libraries and whatever else runs; an estimate is rough by nature, so it errs
on the large side.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import ParameterError

#: the fraction of the available memory a run may plan to hold
SHARE = 0.5


def available() -> Optional[int]:
    """Bytes the system reports available (``MemAvailable``), or None when it cannot tell."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def human(n: float) -> str:
    """``1.5 GiB``-style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check(estimate: float, flag: str, what: str, limit: Optional[float] = None):
    """Raise a ParameterError naming ``flag`` when ``estimate`` bytes exceed ``limit`` (default: half
    of :func:`available`); ``what`` says what would be held."""
    if limit is None:
        avail = available()
        if avail is None:
            return
        limit = SHARE * avail
    if estimate > limit:
        raise ParameterError(f"{flag}: {what} would hold about {human(estimate)}, more than the "
                             f"{human(limit)} allowed (half of the memory available); use smaller sizes")


def attention_bytes(shape, copies: float = 1.0, itemsize: int = 8) -> float:
    """Bytes of q, k, v, out and lse for ``shape = (B, Hq, Sq, Sk, D, Hkv)``, times ``copies``."""
    b, hq, sq, sk, d, hkv = (int(x) for x in shape)
    elements = b * hq * sq * d * 2 + 2 * b * hkv * sk * d + b * hq * sq
    return float(elements) * itemsize * copies
