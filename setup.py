"""The build: quota's request path compiled by mypyc when it can be, pure Python when not.

QUOTA_COMPILE=0 skips the compile; QUOTA_OPT_LEVEL (0-3, default 3) is the C compiler's
optimisation level, lowered only by the wheel's test, whose wheel holds the same files. At level 0
Python's -Wall is off too: its checks tripled that compile of the generated C (gcc took 51 s with
them and 19 s without, timed by hand on 2 shared cores, 2026-12-01). A compile that fails (no C
compiler, no Python headers) leaves the pure build, with setuptools' warning; quota/build.py picks
the build at import."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
BUILD = runpy.run_path(str(HERE / "quota" / "build.py"))


class BuildExt(build_ext):  # type: ignore[misc]
    """Records the digests of the sources compiled, beside the extensions, for quota/build.py."""

    def run(self) -> None:
        super().run()
        record = json.dumps(BUILD["digests"](HERE), indent=1)
        for where in {Path(self.build_lib), *([HERE] if self.inplace or self.editable_mode else [])}:
            target = where / "quota" / "compiled.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(record)


# Commands that only write the package's metadata (pip runs one before each build, in a process of
# its own): mypyc's type check and code generation, a third of a build, would be thrown away there.
METADATA_ONLY = {"egg_info", "dist_info"}
BUILDS = {"bdist_wheel", "build", "build_ext", "install", "develop", "editable_wheel"}


def extensions() -> list[Any]:
    if os.environ.get("QUOTA_COMPILE", "1") == "0":
        return []
    commands = set(sys.argv[1:])
    if commands & METADATA_ONLY and not commands & BUILDS:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    level = os.environ.get("QUOTA_OPT_LEVEL", "3")
    if level not in ("0", "1", "2", "3"):
        raise SystemExit(f"QUOTA_OPT_LEVEL={level!r}: an optimisation level is 0, 1, 2 or 3")
    sources = [str(BUILD["source_of"](m, Path())) for m in BUILD["COMPILED"]]
    # pip builds in an environment without quota's dependencies: their types are unknown (Any)
    # there, which the project's strict mypy settings would refuse. `mypy quota` checks those.
    config = Path(tempfile.mkdtemp(prefix="quota-mypyc-")) / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\n")
    try:
        modules = mypycify(["--config-file", str(config), *sources], opt_level=level, group_name="quota_compiled")
    except (Exception, SystemExit) as exc:  # mypyc exits on what it cannot compile
        print(f"quota: mypyc cannot compile the request path ({exc}); installing the pure-Python build")
        return []
    finally:
        shutil.rmtree(config.parent, ignore_errors=True)
    for module in modules:
        module.optional = True  # a failed compile leaves the pure build, not a failed install
        if level == "0":
            module.extra_compile_args.append("-Wno-all")
    return modules


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
