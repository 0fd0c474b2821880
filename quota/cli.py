"""The `quota` command: plans, config checks, entitlements, bills, usage, subscriptions, serve, proxy.

The config directory comes from --config, else QUOTA_CONFIG, else the one shipped in the package.
The store comes from --redis, else QUOTA_REDIS_URL; commands that read or change stored state
refuse to run without one (an empty in-memory store would answer, or save, nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from quota import cli_output as out
from quota.billing import AppPeak, bill_account, compute_bill
from quota.config import DEFAULT_DIR, Config, load_config
from quota.errors import ConfigError, QuotaError, StorageError
from quota.matrix import Matrix, limit_to_json
from quota.plans import Directory
from quota.store import store_from_url

EXIT_CONFIG = 2
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_STORAGE = 4
# What a process killed by SIGPIPE reports (128 + 13), as `cat` does when `head` stops reading.
EXIT_CLOSED_PIPE = 141
CONFIG_ENV = "QUOTA_CONFIG"
REDIS_ENV = "QUOTA_REDIS_URL"


class NeedsStore(Exception):
    """A command that reads or changes stored state was given no store."""


def _config(path: str | None) -> Config:
    return load_config(path or os.environ.get(CONFIG_ENV) or DEFAULT_DIR)


def _store_url(args: argparse.Namespace) -> str:
    url: str | None = getattr(args, "redis", None) or os.environ.get(REDIS_ENV)
    if not url:
        raise NeedsStore(
            f"{args.command} reads or changes stored state: give --redis URL or set {REDIS_ENV} "
            "(the store quota serve or quota proxy writes to); an in-memory store here would be empty"
        )
    return url


def plans_json(matrix: Matrix) -> dict[str, Any]:
    return {
        "plans": {
            name: {
                "price": {
                    "monthly_fee": str(p.price.monthly_fee),
                    "included_dau": p.price.included_dau,
                    "overage_per_10k_dau": None
                    if p.price.overage_per_10k_dau is None
                    else str(p.price.overage_per_10k_dau),
                },
                "limits": {k: limit_to_json(v) for k, v in p.limits.items()},
                "custom": sorted(p.custom),
                "features": dict(p.features),
                "rates": {k: r.text for k, r in p.rates.items()},
            }
            for name, p in matrix.plans.items()
        }
    }


def _dump(data: Any) -> None:
    # Escaped to ASCII only when the terminal cannot carry the characters: scripts get valid JSON either way.
    print(json.dumps(data, indent=2, ensure_ascii=out.symbols() is out.ASCII))


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        _dump(data)
    else:
        print(out.record_text(data, out.symbols()))


def utc_today() -> date:
    """The CLI's today: UTC, as the middleware's clock counts days (not the shell's local date)."""
    return datetime.now(UTC).date()


def _month(text: str | None) -> tuple[int, int]:
    if not text:
        today = utc_today()
        return today.year, today.month
    try:
        year, month = (int(x) for x in text.split("-"))
        date(year, month, 1)
    except ValueError:
        raise SystemExit(f"quota: --month must be YYYY-MM, found {text!r}") from None
    return year, month


async def _with_store(args: argparse.Namespace, work: Any, *, optional: bool = False) -> Any:
    url = "memory://" if optional else _store_url(args)
    cfg = _config(args.config)
    store = store_from_url(url, timeout_ms=cfg.settings.storage_timeout_ms)
    directory = Directory(cfg.matrix, cfg.accounts, store)
    try:
        await directory.refresh()
        return await work(cfg, directory, store)
    finally:
        await store.close()


def cmd_plans(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    if args.json:
        _dump(plans_json(cfg.matrix))
    else:
        print(out.plans_table(cfg.matrix, show_all=args.all, sym=out.symbols()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _config(args.dir or args.config)
    print(
        f"{cfg.directory}: ok ({len(cfg.matrix.plans)} plans, {len(cfg.routes.rules)} routes, "
        f"{len(cfg.accounts)} accounts)"
    )
    return 0


def cmd_entitlements(args: argparse.Namespace) -> int:
    from quota.api import Quota

    entities = {k: v for k in ("user", "group", "chatroom") if (v := getattr(args, k))}
    # Without a store, the plan as configured (limits, features, rates); usage is stored state.
    stored = bool(entities) or bool(args.redis or os.environ.get(REDIS_ENV))

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        return await Quota(cfg, store).entitlements(args.app, entities, usage=stored)

    _print(asyncio.run(_with_store(args, work, optional=not stored)), args.json)
    if not stored:
        print(f"quota: the plan as configured, without usage (give --redis or {REDIS_ENV} for usage)", file=sys.stderr)
    return 0


def cmd_accounts(args: argparse.Namespace) -> int:
    """`quota accounts diff [NAME]`: what stored changes alter; `quota accounts reset NAME`: drop them."""
    if not args.redis:
        print("quota: accounts diff/reset read the stored changes: pass --redis URL", file=sys.stderr)
        return 2

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        if args.action == "reset":
            if not args.name:
                raise ValueError("accounts reset needs an account name")
            if not await directory.reset(args.name, utc_today()):
                raise KeyError(f"account {args.name!r} has no stored changes")
            return {"account": args.name, "reset": True}
        names = [args.name] if args.name else sorted(directory.stored)
        return {name: directory.diff(name) for name in names}

    found = asyncio.run(_with_store(args, work))
    if args.json or args.action == "reset":
        _dump(found)
    elif not found:
        print("no stored changes: accounts.yaml is in force as written")
    else:
        for name, diff in found.items():
            if not diff:
                print(f"{name}: no stored changes")
            elif "created" in diff:
                print(f"{name}: created {diff['created']}")
            else:
                warn = "  (hides a later edit of accounts.yaml)" if diff["hides_a_yaml_edit"] else ""
                print(f"{name}:{warn}")
                for field, change in diff["fields"].items():
                    print(f"  {field}: accounts.yaml {change['accounts.yaml']!r} -> stored {change['stored']!r}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Exit 0 when quota would allow the request, 1 when it would refuse it."""
    from dataclasses import asdict

    from quota.api import Quota, header_line

    try:
        headers = [header_line(line) for line in args.header] if args.header else None
    except ValueError as exc:
        print(f"quota: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        return await Quota(cfg, store).explain(args.method, args.path, body=args.body, ip=args.ip, headers=headers)

    found = asyncio.run(_with_store(args, work))
    if args.json:
        _dump(asdict(found))
    else:
        print(out.explanation(found))
    return 0 if found.decision.allowed else 1


def cmd_usage(args: argparse.Namespace) -> int:
    from quota.metering import usage_report

    year, month = _month(args.month)

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        if directory.account_of(args.app) is None:
            from quota.errors import UnknownAppError

            raise UnknownAppError(args.app)
        return await usage_report(directory, store, args.app, year, month, utc_today())

    report = asyncio.run(_with_store(args, work))
    if args.json:
        _dump(report)
    else:
        print(out.usage_text(report, out.symbols()))
    return 0


def cmd_bill(args: argparse.Namespace) -> int:
    year, month = _month(args.month)
    if args.all:
        return _bill_all(args, year, month)
    if args.plan:
        cfg = _config(args.config)
        plan = cfg.matrix.plans.get(args.plan)
        if plan is None:
            raise SystemExit(f"quota: unknown plan {args.plan!r} ({', '.join(cfg.matrix.plans)})")
        if not args.peak_dau:
            raise SystemExit("quota: give --peak-dau N once per app")
        if any(n < 0 for n in args.peak_dau):
            raise SystemExit(f"quota: --peak-dau is a number of users (0 or more), found {min(args.peak_dau)}")
        try:
            since = date.fromisoformat(args.subscribed_on) if args.subscribed_on else None
        except ValueError:
            raise SystemExit(f"quota: --subscribed-on must be YYYY-MM-DD, found {args.subscribed_on!r}") from None
        if since is not None and not args.month:
            year, month = since.year, since.month
        if since is not None and (since.year, since.month) > (year, month):
            raise SystemExit(
                f"quota: --subscribed-on {since.isoformat()} is after the month {year:04d}-{month:02d}: "
                "a plan not started yet bills nothing"
            )
        peaks = [AppPeak(f"app{i + 1}", n) for i, n in enumerate(args.peak_dau)]
        bill = compute_bill(plan, peaks, year, month, subscribed_on=since)
    else:
        if not args.account:
            raise SystemExit("quota: bill needs ACCOUNT, --all, or --plan with --peak-dau")

        async def work(cfg: Config, directory: Directory, store: Any) -> Any:
            return await bill_account(directory, store, args.account, year, month, today=utc_today())

        bill = asyncio.run(_with_store(args, work))
    if args.json:
        _dump(bill.to_json())
    elif args.csv:
        print(out.bills_csv([bill]), end="")
    else:
        print(out.bill_text(bill, out.symbols()))
    return 0


def _bill_all(args: argparse.Namespace, year: int, month: int) -> int:
    """Every account's bill for the month; accounts with no subscription in it are listed apart."""
    if args.account or args.plan:
        raise SystemExit("quota: bill --all takes no ACCOUNT and no --plan")
    from quota.billing import billing_plan, check_begun

    today = utc_today()
    # Before any account is read, so that a month not begun prints no partial list.
    check_begun(year, month, today)

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        bills, skipped = [], []
        names = sorted(directory.accounts)
        progress = out.Progress("billing", len(names))
        try:
            for done, name in enumerate(names, 1):
                if billing_plan(directory.accounts[name], year, month)[0] is None:
                    skipped.append(name)
                else:
                    bills.append(await bill_account(directory, store, name, year, month, today=today))
                progress(done)
        finally:
            progress.close()
        return bills, skipped

    bills, skipped = asyncio.run(_with_store(args, work))
    label = f"{year:04d}-{month:02d}"
    if args.json:
        _dump({"month": label, "bills": [b.to_json() for b in bills], "not_billed": skipped})
    elif args.csv:
        print(out.bills_csv(bills), end="")
    else:
        print(out.bills_text(bills, skipped, label, out.symbols()))
    return 0


def cmd_account(args: argparse.Namespace) -> int:
    from quota.admin import apply_change

    day = date.fromisoformat(args.date) if args.date else utc_today()

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        account = directory.accounts.get(args.account)
        if account is None:
            raise KeyError(f"unknown account {args.account!r}")
        if args.action in ("subscribe", "change-plan") and args.plan not in cfg.matrix.plans:
            raise SystemExit(f"quota: {args.action} needs a plan ({', '.join(cfg.matrix.plans)})")
        updated = apply_change(account, args.action, args.plan, day, cfg.matrix.plans)
        await directory.save(updated)
        return updated.to_json()

    _print(asyncio.run(_with_store(args, work)), args.json)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    import time

    from quota.errors import UnknownAppError
    from quota.privacy import forget_user

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        if directory.account_of(args.app) is None:
            raise UnknownAppError(args.app)
        progress = out.Progress(f"forgetting {args.user}")
        try:
            return await forget_user(
                store, cfg.routes, args.app, args.user, int(time.time() * 1000), progress, ids=cfg.settings.identifiers
            )
        finally:
            progress.close()

    _print(asyncio.run(_with_store(args, work)), args.json)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from quota.errors import UnknownAppError
    from quota.reconcile import read_source, reconcile

    _store_url(args)  # before reading the source: without a store there is nothing to reconcile
    truth = read_source(args.source)

    async def work(cfg: Config, directory: Directory, store: Any) -> Any:
        if directory.account_of(args.app) is None:
            raise UnknownAppError(args.app)
        progress = out.Progress(f"reconciling {args.app}")
        try:
            return {"app": args.app, **await reconcile(store, args.app, truth, progress)}
        finally:
            progress.close()

    _print(asyncio.run(_with_store(args, work)), args.json)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"quota: {target} exists and is not empty; init writes only into a new or empty directory")
    target.mkdir(parents=True, exist_ok=True)
    for source in sorted(DEFAULT_DIR.glob("*.yaml")):
        shutil.copyfile(source, target / source.name)
    print(f"wrote {', '.join(p.name for p in sorted(target.glob('*.yaml')))} to {target}")
    print(f"use it with --config {target} or {CONFIG_ENV}={target}; check it with: quota check-config {target}")
    return 0


def _serve_options(args: argparse.Namespace) -> Any:
    from quota.serve import Options

    if args.workers < 1:
        raise SystemExit(f"quota: --workers must be 1 or more, found {args.workers}")
    return Options(
        config=args.config or os.environ.get(CONFIG_ENV),
        redis_url=args.redis or os.environ.get(REDIS_ENV),
        host=args.host,
        port=args.port,
        workers=args.workers,
        require_store=args.require_store,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from quota.serve import run

    return run(_serve_options(args))


def cmd_proxy(args: argparse.Namespace) -> int:
    from quota.proxy import Upstream
    from quota.serve import run

    options = _serve_options(args)
    options.upstream = args.upstream
    options.upstream_options = {
        "connect_timeout": args.connect_timeout,
        "read_timeout": args.read_timeout,
        "connections": args.connections,
        "keepalive": args.keepalive,
        "max_body_bytes": _config(options.config).settings.max_body_bytes,
    }
    try:
        Upstream(options.upstream, **options.upstream_options)
    except ValueError as exc:
        raise SystemExit(f"quota: {exc}") from None
    return run(options)


def cmd_check_routes(args: argparse.Namespace) -> int:
    from quota.coverage import load_upstream, served_routes, uncovered

    cfg = _config(args.config)
    upstream = load_upstream(args.upstream)
    gaps = uncovered(upstream, cfg.routes)
    total = sum(1 for _ in served_routes(upstream))
    if args.json:
        print(json.dumps({"served": total, "uncovered": [{"method": m, "path": p} for m, p in gaps]}, indent=2))
    elif gaps:
        policy = "refused (404)" if cfg.routes.unmatched.refuse else "held to the general per-IP rate only"
        print(f"{len(gaps)} of {total} routes of {args.upstream} are not in the route map; they are {policy}:")
        for method, path in gaps:
            print(f"  {method:9s} {path}")
    else:
        print(f"all {total} routes of {args.upstream} are in the route map")
    return 1 if gaps else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="quota", description="Hold IM apps to their plans.")
    top.add_argument("--version", action="version", version=f"quota {_version()}")
    sub = top.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, store: bool = False) -> None:
        p.add_argument("--config", help=f"config directory (default ${CONFIG_ENV}, else the shipped {DEFAULT_DIR})")
        if store:
            p.add_argument(
                "--redis", help=f"the store: redis://host:port/db, redis+cluster://..., ... (default ${REDIS_ENV})"
            )

    p = sub.add_parser("plans", help="print the limit matrix, plans as columns")
    common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="every feature, not only those that differ between plans")
    p.set_defaults(func=cmd_plans)

    p = sub.add_parser("check-config", help="validate a config directory")
    common(p)
    p.add_argument("dir", nargs="?")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("init", help="write an editable copy of the shipped config to a new directory")
    p.add_argument("dir")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("entitlements", help="what an app's plan allows and how much is used")
    common(p, store=True)
    p.add_argument("app", help="appkey org#app")
    p.add_argument("--json", action="store_true")
    for kind in ("user", "group", "chatroom"):
        p.add_argument(f"--{kind}", help=f"also show one {kind}'s counters")
    p.set_defaults(func=cmd_entitlements)

    p = sub.add_parser("accounts", help="stored changes to accounts: diff [NAME] shows them, reset NAME drops them")
    common(p, store=True)
    p.add_argument("action", choices=["diff", "reset"])
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_accounts)

    p = sub.add_parser("explain", help="what quota would decide for a request, and why, consuming nothing")
    common(p, store=True)
    p.add_argument("method", help="GET, POST, PUT, DELETE, HEAD or WEBSOCKET")
    p.add_argument("path", help="the request path, /org/app/...")
    p.add_argument("--body", help="the request body (JSON)")
    p.add_argument("--ip", default="203.0.113.1", help="the client's address")
    p.add_argument(
        "-H",
        "--header",
        action="append",
        help="a request header, `Name: value` (repeatable); with none, Content-Type: application/json",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("usage", help="an app's DAU per day, MAU, peak online and limits in a month")
    common(p, store=True)
    p.add_argument("app")
    p.add_argument("--month", help="YYYY-MM (default this month)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("bill", help="an account's bill for a month, every account's (--all), or a what-if bill")
    common(p, store=True)
    p.add_argument("account", nargs="?")
    p.add_argument("--all", action="store_true", help="every account's bill for --month, in one run")
    p.add_argument("--month", help="YYYY-MM (default this month)")
    p.add_argument("--plan", help="what-if: bill this plan for the given peaks")
    p.add_argument("--peak-dau", type=int, action="append", help="what-if: one app's peak DAU (repeat per app)")
    p.add_argument("--subscribed-on", help="what-if: YYYY-MM-DD the subscription started (prorates the fee)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true", help="one row per account, for spreadsheets")
    p.set_defaults(func=cmd_bill)

    for action in ("subscribe", "change-plan", "cancel", "freeze", "unfreeze"):
        p = sub.add_parser(action, help=f"{action} an account (stored in --redis)")
        common(p, store=True)
        p.add_argument("account")
        if action in ("subscribe", "change-plan"):
            p.add_argument("plan")
        p.add_argument("--date", help="YYYY-MM-DD (default today)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_account, action=action, plan=getattr(p, "plan", None))

    p = sub.add_parser("forget-user", help="remove every trace of a user from quota's storage")
    common(p, store=True)
    p.add_argument("app", help="appkey org#app")
    p.add_argument("user")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("reconcile", help="rebuild an app's counters from the gateway's truth")
    common(p, store=True)
    p.add_argument("app", help="appkey org#app")
    p.add_argument("--source", required=True, help="a JSON file, or an http(s) URL such as the gateway's /_state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reconcile)

    def served(p: argparse.ArgumentParser) -> None:
        common(p, store=True)
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
        p.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
        p.add_argument("--workers", type=int, default=1, help="worker processes (default %(default)s)")
        p.add_argument(
            "--require-store",
            action="store_true",
            help="refuse to start when the store does not answer (default: warn, and the outage policy applies)",
        )

    p = sub.add_parser("check-routes", help="list the routes an ASGI upstream serves that the route map does not name")
    common(p)
    p.add_argument(
        "--upstream", default="quota.gateway:create_gateway", help="module:attribute of a Starlette app or its factory"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_routes)

    p = sub.add_parser("serve", help="serve the reference IM gateway wrapped in the middleware (SIGHUP reloads)")
    served(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("proxy", help="hold the apps of any HTTP gateway to their plans, as a reverse proxy")
    served(p)
    p.add_argument("--upstream", required=True, help="the gateway's base URL, http(s)://host[:port][/prefix]")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect upstream (502 past it)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds between upstream bytes (504 past it)")
    p.add_argument("--connections", type=int, default=256, help="most upstream connections (default %(default)s)")
    p.add_argument(
        "--keepalive",
        type=float,
        default=4.0,
        help="seconds an idle upstream connection is kept; below the upstream's own idle timeout (default %(default)s)",
    )
    p.set_defaults(func=cmd_proxy)
    return top


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quota")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not hasattr(args, "plan"):
        args.plan = None
    _tolerant_output()
    try:
        code = int(args.func(args))
        # Flushed here, not at exit, so a reader that went away is met by the handler below.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except NeedsStore as exc:
        print(f"quota: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"quota: configuration is not valid:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (KeyError, QuotaError, ValueError, OSError) as exc:
        if isinstance(exc, StorageError):
            print(f"quota: storage unavailable: {exc}", file=sys.stderr)
            return EXIT_STORAGE
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"quota: {message}", file=sys.stderr)
        return EXIT_NOT_FOUND


def _tolerant_output() -> None:
    # A character the terminal cannot encode prints as '?' instead of ending the command with a
    # traceback; the deliberate symbols already fall back to ASCII (cli_output.symbols).
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


def _closed_pipe() -> int:
    """The reader closed the pipe (`quota plans | head`): stop quietly. Later writes, the
    interpreter's own flush at exit included, go to /dev/null instead of raising again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_CLOSED_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
