"""Admin tokens and their scopes, and URLs shown without the secrets they carry.

Two scopes, each with its own token:
    read   metrics, entitlements, usage, bills, account records, the dashboard
    admin  everything read may do, plus changes (plans, freezes, allowlists, forget, reload)

Tokens come from the environment (QUOTA_ADMIN_TOKEN, QUOTA_READ_TOKEN), which wins, or from
quota.yaml (admin_token, read_token). A token shorter than MIN_LENGTH is refused wherever it comes
from: the process does not start with it. Comparisons run in constant time.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from quota.errors import ConfigError, Problem

MIN_LENGTH = 16
Scope = Literal["read", "admin"]
ENV = {"admin": "QUOTA_ADMIN_TOKEN", "read": "QUOTA_READ_TOKEN"}


@dataclass(frozen=True)
class Tokens:
    admin: str | None = None
    read: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.admin or self.read)

    def scope_of(self, given: str) -> Scope | None:
        """The scope a presented token grants, or None. Both are compared, always, in constant time."""
        data = given.encode()
        admin = self.admin is not None and hmac.compare_digest(data, self.admin.encode())
        read = self.read is not None and hmac.compare_digest(data, self.read.encode())
        return "admin" if admin else "read" if read else None

    def grants(self, given: str, needed: Scope) -> bool:
        scope = self.scope_of(given)
        return scope == "admin" or (scope == "read" and needed == "read")


def bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def resolve(admin: str | None, read: str | None, environ: Mapping[str, str] | None = None) -> Tokens:
    """The tokens in force: environment first, then the config's; raises ConfigError on a short one."""
    env = os.environ if environ is None else environ
    problems: list[Problem] = []
    found: dict[str, str | None] = {}
    for scope, configured in (("admin", admin), ("read", read)):
        name = ENV[scope]
        value = env.get(name) or configured
        if value is not None and len(value) < MIN_LENGTH:
            where = name if env.get(name) else "quota.yaml"
            key = name if env.get(name) else f"{scope}_token"
            problems.append(Problem(where, key, f"a token of at least {MIN_LENGTH} characters", f"{len(value)}"))
        found[scope] = value or None
    if found["admin"] and found["admin"] == found["read"]:
        problems.append(Problem("tokens", "read_token", "a token different from the admin token", "the same"))
    if problems:
        raise ConfigError(problems)
    return Tokens(admin=found["admin"], read=found["read"])


def masked_url(url: str) -> str:
    """A URL fit for a log line or an error: its password and its query (where tokens ride) shown
    as ***, the rest as written."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.partition("://")[0] + "://***"
    netloc = parts.netloc
    creds, at, host = netloc.rpartition("@")
    if at:
        netloc = f"{creds.partition(':')[0]}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))
