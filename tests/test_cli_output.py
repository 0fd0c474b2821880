"""What `quota` prints for people: the plans table, money, the DAU chart, progress bars, bills of
every account, records, the ASCII fallback and a quiet exit on a closed pipe. Run as a user runs
it: `python -m quota ...` in a subprocess (a pseudo-terminal where a terminal matters)."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import sys
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quota.cli_output import ASCII, UNICODE, dau_chart, width
from quota.display import money
from tests.activity import AppActivity, config_with, fill, previous_month
from tests.conftest import ROOT, RedisServer, run_cli

PLANS = ("free", "basic", "pro", "enterprise")


def _in_terminal(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout piped): what a person at a shell sees."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    stdout, _ = proc.communicate(timeout=timeout)
    os.close(master)
    return proc.returncode, stdout, seen.decode("utf-8", "replace")


def test_plans_table_shape() -> None:
    """Prices first, then limits and rates, then only the features that differ (14 of 64 today),
    one column per plan, under 100 columns; --all lists every feature. Catches: the 94-line,
    134-column table, identical feature rows, money without its unit."""
    data = json.loads(run_cli("plans", "--json").stdout)["plans"]
    features = list(data["free"]["features"])
    differ = [f for f in features if len({data[p]["features"][f] for p in PLANS}) > 1]
    out = run_cli("plans")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == list(PLANS)
    headings = [line for line in lines if line and not line.startswith(" ") and line.split()[0] != "free"]
    assert headings[:4] == ["Price", "Limits", "Rates", f"Features that differ ({len(differ)} of {len(features)})"]
    assert lines[2].split()[-2:] == ["4,888", "元"] and "2,888 元" in lines[2]
    start = lines.index(headings[3]) + 1
    rows = [line for line in lines[start:] if line.startswith("  ")]
    assert [r.split("  ")[1].strip().replace(" ", "_") for r in rows] == differ
    cells = [r.split()[-4:] for r in rows]
    assert all(set(c) <= {"✓", "✖"} and len(set(c)) == 2 for c in cells)
    assert max(width(line) for line in lines) <= 100 and len(lines) < 45
    full = run_cli("plans", "--all").stdout.splitlines()
    assert f"Features (all {len(features)})" in full and len(full) - len(lines) == len(features) - len(differ) - 1


def test_money_format() -> None:
    """Money prints with thousands separators, exact decimals and its unit, from a Decimal only.
    Catches: `7669.975`, a float slipping into money, a lost unit."""
    assert money(Decimal("8557.975")) == "8,557.975 元"
    assert money(Decimal("0.000")) == "0.000 元"
    assert money(Decimal("1234567.5"), "CNY") == "1,234,567.5 CNY"
    with pytest.raises(TypeError):
        money(8557.975)  # type: ignore[arg-type]
    out = run_cli("bill", "--plan", "basic", "--peak-dau", "82370", "--peak-dau", "17865", "--month", "2026-10")
    assert out.returncode == 0, out.stderr
    assert "8,557.975 元" in out.stdout and "7,669.975 元" in out.stdout and "850 元 per 10,000 DAU" in out.stdout


def test_dau_chart_draws_days_peak_and_included_line() -> None:
    """One column pair per day, bar heights proportional to DAU (full blocks at the peak), the
    included line on its row, the peak day reaching the top. Catches: 30 lines of numbers, a
    chart not to scale, a missing included line."""
    daily = {date(2026, 11, d).isoformat(): 100 * d for d in range(1, 31)}
    chart = dau_chart(daily, 2000).splitlines()
    assert len(chart) == 9
    top, bottom = chart[0], chart[7]
    assert top.startswith("3,000 │") and top.rstrip().endswith("█")
    bars = bottom.split("│")[1]
    assert len(bars.rstrip()) == 59 and bars[0::2].count("█") >= 25
    line = next(r for r in chart if "included 2,000" in r)
    assert chart.index(line) == 2 and "┄" in line
    heights = [sum(1 for row in chart[:8] if row.split("│")[1].ljust(60)[2 * i] == "█") for i in range(30)]
    assert heights == sorted(heights) and heights[-1] == 8 and heights[0] == 0
    far = dau_chart({"2026-11-01": 10, "2026-11-02": 20}, 10000).splitlines()
    assert "above the chart" in far[-1] and not any("included" in r for r in far[:-1])
    assert set("".join(dau_chart(daily, 2000, sym=ASCII))) <= set(" 0123456789,|#:.-includedabovthcrpk()%\n")


@pytest.fixture
def month(redis_server: RedisServer, tmp_path: Path) -> dict[str, Any]:
    """Last month's activity of acme (basic, two apps, over its included DAU) in our redis-server."""
    redis_server.flush()
    year, mon = previous_month()
    cfg = config_with(
        tmp_path / "config",
        "  acme:\n    plan: basic\n    apps: ['acme#chat', 'acme#game']\n"
        "  later:\n    plan: pro\n    apps: ['later#app']\n    subscribed_on: 2099-01-01\n",
    )
    written = fill(
        redis_server.port,
        [AppActivity("acme#chat", base=6000, growth=100), AppActivity("acme#game", base=2000, growth=50)],
        year,
        mon,
    )
    store = ["--config", str(cfg), "--redis", redis_server.url]
    return {"month": f"{year:04d}-{mon:02d}", "store": store, "written": written, "config": cfg}


@pytest.mark.redis
def test_usage_prints_a_chart(month: dict[str, Any]) -> None:
    """`quota usage` shows the month's DAU as a chart with the peak and the included line, then
    MAU and caps; --json keeps every day. Catches: the month printed as 30 lines of numbers."""
    out = run_cli("usage", "acme#chat", "--month", month["month"], *month["store"])
    assert out.returncode == 0, out.stderr
    written = month["written"]["acme#chat"]
    peak = max(written.values())
    peak_day = min(d for d, n in written.items() if n == peak)
    text = out.stdout
    assert f"peak {peak:,} on {peak_day.day} {peak_day:%b} {peak_day.year}" in text
    assert "included 10,000" in text and "█" in text and "MAU" in text
    assert len(text.splitlines()) < 30
    data = json.loads(run_cli("usage", "acme#chat", "--month", month["month"], "--json", *month["store"]).stdout)
    assert len(data["dau"]) == len(written) and data["peak_dau"] == peak and data["included_dau"] == 10000


@pytest.mark.redis
def test_bill_all_accounts(month: dict[str, Any]) -> None:
    """`quota bill --all --month` bills every account in one run, as a table, CSV or JSON, each
    equal to its own `quota bill --json`; accounts without a subscription that month are listed
    apart. Catches: a missing account, a total that differs from the single bill, floats in CSV."""
    args = ("bill", "--all", "--month", month["month"], *month["store"])
    data = json.loads(run_cli(*args, "--json").stdout)
    assert data["not_billed"] == ["later"]
    names = [b["account"] for b in data["bills"]]
    assert names == sorted(["acme", "demo-basic", "demo-enterprise", "demo-free", "demo-pro"])
    for b in data["bills"]:
        one = json.loads(run_cli("bill", b["account"], "--month", month["month"], "--json", *month["store"]).stdout)
        assert one == b
    rows = list(csv.DictReader(io.StringIO(run_cli(*args, "--csv").stdout)))
    assert [r["account"] for r in rows] == names
    acme = next(r for r in rows if r["account"] == "acme")
    assert Decimal(acme["total"]) == Decimal(next(b for b in data["bills"] if b["account"] == "acme")["total"])
    assert acme["total"].count(".") == 1 and "," not in acme["total"]
    text = run_cli(*args).stdout
    total = sum(Decimal(b["total"]) for b in data["bills"])
    assert f"{total:,} 元" in text and "not billed (no subscription in" in text and "later" in text


@pytest.mark.redis
def test_progress_bars_on_long_runs(month: dict[str, Any], tmp_path: Path) -> None:
    """reconcile (3,000 sets), forget-user and bill --all draw a progress bar on a terminal that
    ends at 100%, and print none into a pipe. Catches: long work with no sign of life, or bar
    frames polluting a log."""
    users = [f"u{i}" for i in range(3000)]
    source = tmp_path / "state.json"
    source.write_text(json.dumps({"users": users, "contacts": {u: ["u0"] for u in users}}))
    code, stdout, terminal = _in_terminal("reconcile", "acme#chat", "--source", str(source), *month["store"])
    assert code == 0, terminal
    frames = [f for f in terminal.split("\r") if f.strip()]
    assert len(frames) >= 2 and frames[-1].startswith("reconciling acme#chat")
    assert "3,003/3,003 100%" in frames[-1] and "█" * 30 in frames[-1]
    assert "sets written  3,001" in stdout
    code, stdout, terminal = _in_terminal("forget-user", "acme#chat", "u5", *month["store"])
    assert code == 0 and "forgetting u5" in terminal and "100%" in terminal
    code, stdout, terminal = _in_terminal("bill", "--all", "--month", month["month"], *month["store"])
    assert code == 0 and "billing" in terminal and "6/6 100%" in terminal
    piped = run_cli("reconcile", "acme#chat", "--source", str(source), *month["store"])
    assert piped.returncode == 0 and piped.stderr == ""


def test_quiet_exit_on_a_closed_pipe() -> None:
    """When the reader goes away (`quota plans | head`), quota stops without a message and with
    the status of a process ended by SIGPIPE. Catches: `quota: [Errno 32] Broken pipe`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota", "plans", "--all"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(30) == 141 and err == b""


@pytest.mark.parametrize(
    "args",
    [
        ("plans",),
        ("bill", "--plan", "basic", "--peak-dau", "82370", "--peak-dau", "17865", "--month", "2026-10"),
        ("entitlements", "demo#free"),
        ("plans", "--json"),
    ],
)
def test_ascii_fallback(args: tuple[str, ...]) -> None:
    """On a terminal that cannot encode ✓, ✖ or 元 (PYTHONIOENCODING=ascii) output is plain ASCII
    with words for the symbols, and JSON stays valid. Catches: exit 3 with a UnicodeEncodeError."""
    out = subprocess.run(
        [sys.executable, "-m", "quota", *args],
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode("ascii")
    if args[0] == "plans" and "--json" not in args:
        assert " yes " in text + " " and " no " in text and "CNY" in text and "?" not in text
    if args[0] == "bill":
        assert "8,557.975 CNY" in text
    if "--json" in args:
        assert json.loads(text)["plans"]["free"]["price"]["monthly_fee"] == "0"
    assert UNICODE.yes not in text


@pytest.mark.redis
def test_records_print_as_people_write_them(redis_server: RedisServer) -> None:
    """Account output names apps as a list of words and dates as `1 Apr 2026`; nothing unset is
    called unlimited. Catches: `['demo#basic']` and `frozen_on: unlimited`."""
    redis_server.flush()
    out = run_cli("cancel", "demo-basic", "--date", "2026-03-10", "--redis", redis_server.url)
    assert out.returncode == 0, out.stderr
    assert "['" not in out.stdout and "unlimited" not in out.stdout
    assert "apps" in out.stdout and "demo#basic" in out.stdout
    assert "basic from 1 Jan 2000 until 1 Apr 2026" in out.stdout and "not frozen" in out.stdout
