"""numba's on-disk cache, keyed on every kernel source file of this package.

numba invalidates a cached function when *its own* source file changes (a sha256 of the file since
numba 0.57) but not when a function it calls from another file does: after a change to
``_tiles.py``, ``_fastexp.py`` or ``_philox.py`` alone -- an upgrade of refattn, or a developer's
edit -- the cached ``_kernels.forward`` would go on running the old arithmetic (and differ in the
last bits from a fresh compile). This module registers cache locators, ahead of numba's own, that
serve only the files of this package and add the digest of all of them (:data:`PACKAGE_DIGEST`)
to the source stamp numba checks, so any change to any kernel source recompiles every kernel.

It relies on numba's cache-locator classes (``numba.core.caching``), which have kept their shape
from numba 0.50 to 0.68; where they are not found, :data:`INSTALLED` is False and
``tests/test_numba.py`` fails, so a numba upgrade cannot silently bring the stale-cache problem back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def package_digest(where: Path = HERE) -> bytes:
    """sha256 over the names and contents of every ``.py`` file of the package in ``where``."""
    h = hashlib.sha256()
    for path in sorted(Path(where).glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.digest()


PACKAGE_DIGEST = package_digest()


def _ours(py_file) -> bool:
    try:
        return Path(py_file).resolve().parent == HERE
    except (OSError, TypeError):
        return False


def _install() -> bool:
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover
        return False
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = [getattr(caching, n, None) or getattr(caching, "_" + n, None) for n in names]
    if impl is None or not hasattr(impl, "_locator_classes") or None in bases:
        return False

    def locator(base):
        class PackageStamped(base):
            """``base``, for this package's files only, with the package digest in the stamp."""

            @classmethod
            def from_function(cls, py_func, py_file):
                return super().from_function(py_func, py_file) if _ours(py_file) else None

            def get_source_stamp(self):
                return (super().get_source_stamp(), PACKAGE_DIGEST)

        PackageStamped.__name__ = f"PackageStamped{base.__name__}"
        return PackageStamped

    ours = [locator(b) for b in bases]
    if not any(getattr(c, "__name__", "").startswith("PackageStamped") for c in impl._locator_classes):
        impl._locator_classes = ours + list(impl._locator_classes)
    return True


INSTALLED = _install()
