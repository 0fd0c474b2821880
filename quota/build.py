"""Which build of the request path this process runs: the modules mypyc compiled when quota was
installed, or their Python source.

`setup.py` compiles COMPILED (when mypyc and a C compiler are there; a failure leaves the pure
build) and records a digest of their sources in `compiled.json`. At import, quota runs the compiled
modules only when every one of them is built and its source is the one compiled; otherwise, or
when QUOTA_PURE=1, a finder loads all of them from source. All or none: compiled modules call each
other inside one shared library, so a half-compiled request path would run two copies of a module.

This file imports nothing of quota: setup.py reads it before quota's dependencies exist."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILED = (
    "quota.breaker",
    "quota.clients",
    "quota.deadlines",
    "quota.decisions",
    "quota.denials",
    "quota.guard",
    "quota.identifiers",
    "quota.keys",
    "quota.metrics",
    "quota.middleware",
    "quota.plans",
    "quota.responses",
    "quota.routes",
    "quota.store.memory",
    "quota.store.program",
    "quota.store.redis",
    "quota.store.wire",
)
PACKAGE = Path(__file__).resolve().parent
DIGESTS = PACKAGE / "compiled.json"


def source_of(module: str, root: Path = PACKAGE.parent) -> Path:
    """The .py file of `module` under `root` (the directory holding quota/)."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def digests(root: Path = PACKAGE.parent) -> dict[str, str]:
    """sha256 of each compiled module's source under `root`."""
    return {m: hashlib.sha256(source_of(m, root).read_bytes()).hexdigest() for m in COMPILED}


def _built(module: str) -> bool:
    source = source_of(module)
    return any(source.with_name(source.stem + suffix).exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def choose() -> tuple[str, str]:
    """("compiled" | "pure", why)."""
    if os.environ.get("QUOTA_PURE", "") not in ("", "0"):
        return "pure", "QUOTA_PURE is set"
    missing = [m for m in COMPILED if not _built(m)]
    if missing:
        return "pure", "not compiled at install" if len(missing) == len(COMPILED) else f"{missing[0]} not compiled"
    try:
        recorded = json.loads(DIGESTS.read_text())
    except (OSError, ValueError):
        return "pure", f"{DIGESTS.name} missing or unreadable"
    changed = [m for m, digest in digests().items() if recorded.get(m) != digest]
    if changed:
        return "pure", f"{source_of(changed[0]).name} changed since it was compiled (pip install again)"
    return "compiled", "every compiled module matches its source"


class _Source(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their .py files, ahead of the extension beside them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


BUILD, WHY = choose()
if BUILD == "pure" and not any(isinstance(f, _Source) for f in sys.meta_path):
    sys.meta_path.insert(0, _Source())
