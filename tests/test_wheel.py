"""quota as a user installs it: a wheel built from the checkout, installed into a fresh virtualenv
outside it, whose commands find the config shipped inside the package. The wheel is of the build
this run tests: compiled by mypyc, or pure Python (QUOTA_COMPILE=0)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

from quota.build import BUILD
from tests.conftest import ROOT, free_port

# What a checkout holds beyond its sources: environments, caches, and this machine's builds.
LOCAL = (".venv", ".git", "build", "mutants", "*.egg-info", "*.so", "__pycache__", ".*_cache", ".hypothesis")
SHOW = "import quota, quota.config as c; print(c.DEFAULT_DIR); print(quota.BUILD)"


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    """The wheel holds the default config and the Lua program; installed elsewhere, `quota plans`,
    `quota check-config` and `quota serve` work from a directory with no config/ in sight.
    Installed from a compiled wheel it runs the compiled request path, which finds its digests.
    Catches: config/ or the Lua program missing from the wheel, commands that need the checkout, a
    compiled wheel that installs but runs from source (compiled.json missing or wrong)."""
    build = os.environ.get("QUOTA_EXPECT_BUILD", BUILD)
    # From a copy: setuptools builds in the tree it is given, and run-tests runs two suites at once.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LOCAL))
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
        # Compiled at -O0: the same files as -O3 (what is checked here), for a shorter compile.
        env={**os.environ, "QUOTA_COMPILE": "1" if build == "compiled" else "0", "QUOTA_OPT_LEVEL": "0"},
    )
    (wheel,) = dist.glob("quota-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "quota/middleware.py" in names
    assert ("quota/compiled.json" in names) >= (build == "compiled")  # the digests, beside the extensions
    assert any(n.startswith("quota/middleware.") and n.endswith(".so") for n in names) == (build == "compiled")
    for name in ("plans.yaml", "routes.yaml", "accounts.yaml", "quota.yaml"):
        assert f"quota/defaults/{name}" in names
    assert "quota/store/lua/program.lua" in names and "quota/py.typed" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    quota = str(venv / "bin" / "quota")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [quota, *args], cwd=work, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
        )

    where, built = subprocess.run(
        [str(venv / "bin" / "python"), "-c", SHOW],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout.split()
    assert where.startswith(str(venv)) and where.endswith("quota/defaults")
    assert built == build
    plans = run("plans", "--json")
    assert plans.returncode == 0 and '"friends_per_user": 100' in plans.stdout, plans.stderr
    checked = run("check-config")
    assert checked.returncode == 0 and "ok (4 plans" in checked.stdout, checked.stderr
    port = free_port()
    server = subprocess.Popen(
        [quota, "serve", "--port", str(port)], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/_quota/health", timeout=1)
                break
            except httpx.HTTPError:
                assert server.poll() is None and time.time() < deadline, "quota serve from the wheel did not start"
                time.sleep(0.1)
        assert health.json() == {"status": "ok"}
        refused = httpx.post(f"http://127.0.0.1:{port}/demo/free/messages/translate", json={})
        assert refused.status_code == 403 and refused.json()["limit"] == "translation"
    finally:
        server.terminate()
        server.wait(10)


def test_metadata_alone_compiles_nothing(tmp_path: Path) -> None:
    """pip asks for a package's metadata in a process of its own before it builds: setup.py must not
    run mypyc there (its type check and C code, a third of a build, thrown away). Catches the
    metadata step compiling: mypyc writes its C sources under build/ when it runs."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LOCAL))
    (tmp_path / "meta").mkdir()
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path / "meta")],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QUOTA_COMPILE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "meta" / "quota.egg-info" / "PKG-INFO").is_file()
    assert not list(source.glob("build/**/*.c"))
