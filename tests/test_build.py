"""The two builds of the request path (quota/build.py): compiled by mypyc at install, or pure
Python, chosen at import. run-tests runs the suite once on each and says which it expects."""

from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import quota
import quota.middleware
from quota.build import COMPILED, digests, source_of
from tests.conftest import ROOT

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
AWAITS = (ast.Await, ast.AsyncWith, ast.AsyncFor)


def test_the_suite_runs_on_the_build_it_expects() -> None:
    """Catches a CI run that believes it tests the compiled build while the compile silently failed
    (setup.py makes a failed compile optional), or the pure run that still loads extensions."""
    expected = os.environ.get("QUOTA_EXPECT_BUILD", quota.BUILD)
    assert quota.BUILD == expected, f"expected the {expected} build: {quota.build.WHY}"
    loaded = Path(quota.middleware.__file__ or "")
    assert loaded.suffix == (".so" if expected == "compiled" else ".py"), loaded


def copy_of_quota(tmp_path: Path) -> Path:
    """quota's package in a scratch directory, with a stand-in (broken) extension beside each
    compiled module and the digests of their sources recorded, as an install would leave them."""
    shutil.copytree(ROOT / "quota", tmp_path / "quota", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for module in COMPILED:
        source = source_of(module, tmp_path)
        source.with_name(source.stem + SUFFIX).write_bytes(b"not an extension")
    (tmp_path / "quota" / "compiled.json").write_text(json.dumps(digests(tmp_path)))
    return tmp_path


def which_build(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    code = "import quota, quota.build as b, quota.middleware as m; print(b.BUILD, m.__file__); print(b.WHY)"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "QUOTA_PURE": "", **env},
        timeout=60,
    )


def test_a_source_changed_since_the_compile_runs_from_source(tmp_path: Path) -> None:
    """Catches an edited module that keeps running its stale compiled copy (an edit that seems to
    do nothing, or a mutation test that tests the unmutated code): the whole request path then
    loads from source, ahead of the extensions beside it, and says why."""
    root = copy_of_quota(tmp_path)
    routes = root / "quota" / "routes.py"
    routes.write_text(routes.read_text() + "\n# edited\n")
    done = which_build(root)
    assert done.returncode == 0, done.stderr
    first, why = done.stdout.splitlines()
    assert first == f"pure {root / 'quota' / 'middleware.py'}"
    assert why == "routes.py changed since it was compiled (pip install again)"


def test_a_partial_compile_runs_all_from_source(tmp_path: Path) -> None:
    """Catches a half-compiled request path (compiled modules call each other inside one library,
    so a module loaded from source beside them would run twice, with two states)."""
    root = copy_of_quota(tmp_path)
    (root / "quota" / "store" / f"program{SUFFIX}").unlink()
    done = which_build(root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"pure {root / 'quota' / 'middleware.py'}", "quota.store.program not compiled"]


def test_quota_pure_chooses_the_source(tmp_path: Path) -> None:
    """QUOTA_PURE=1 runs the Python source even where every extension is in place and current: the
    fallback a user reaches for when a compiled module misbehaves. Catches the switch ignored."""
    root = copy_of_quota(tmp_path)
    done = which_build(root, QUOTA_PURE="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"pure {root / 'quota' / 'middleware.py'}", "QUOTA_PURE is set"]
    chosen = which_build(root)  # without it, the (stand-in) extensions are what loads
    assert chosen.returncode != 0 and "ImportError" in chosen.stderr, chosen.stderr


def test_no_await_inside_an_except_or_finally_clause_of_a_compiled_module() -> None:
    """mypyc's compiled coroutines lose the exception being handled across an await in its handler:
    re-raising it then crashed the process (a segfault when a client went away mid-request). The
    compiled modules hold the exception and await after the clause instead."""
    found = []
    for module in COMPILED:
        tree = ast.parse(source_of(module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):
                clauses = [h.body for h in node.handlers] + [node.finalbody]
                for body in clauses:
                    if any(isinstance(n, AWAITS) for stmt in body for n in ast.walk(stmt)):
                        found.append(f"{module}:{node.lineno}")
    assert found == []
