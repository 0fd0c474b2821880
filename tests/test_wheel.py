"""quota as a user installs it: a wheel built from the checkout, installed into a fresh virtualenv
outside it, whose commands find the config shipped inside the package."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    """The wheel holds the default config and the Lua program; installed elsewhere, `quota plans`,
    `quota check-config` and `quota serve` work from a directory with no config/ in sight.
    Catches: config/ or the Lua program missing from the wheel, commands that need the checkout."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (wheel,) = dist.glob("quota-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
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

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import quota.config as c; print(c.DEFAULT_DIR)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)) and where.endswith("quota/defaults")
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
