"""Dashboard sessions: a token given once at the login form becomes a signed, expiring cookie.

Who may sign in:
    the read or the admin token      an operator: every account and app
    an account's dashboard token     a customer: that account's apps only (accounts.yaml holds
                                     its SHA-256 as dashboard_token_sha256, never the token)

The cookie is `<who>.<expires>.<nonce>.<mac>`, the mac an HMAC-SHA256 keyed by the token behind it (for a
customer: the operators' token and the account's token hash, so neither can be swapped). Nothing
is kept in the process, so every worker accepts it, and rotating a token ends every session made
with it. A sign-out marks the cookie in the store (by its hash) until it would have expired, so a
copy of it ends there too, in every process. The token never leaves the login form's body: not in
a URL, not in the cookie. The cookie is HttpOnly (no script reads it) and SameSite=Strict (no other
site's page sends it), and each state-changing form (logout) also carries a field derived from the
session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from quota.accounts import Account
from quota.tokens import MIN_LENGTH, Tokens

COOKIE = "quota_dashboard"
LIFETIME_S = 8 * 3600
NONCE_BYTES = 8
ACCOUNT_PREFIX = "acct-"

Who = Literal["admin", "read", "account"]


@dataclass(frozen=True)
class Session:
    who: Who
    expires: int
    cookie: str
    # The one account a customer's session may see; None for operators, who see every account.
    account: str | None = None

    def sees(self, account: str | None) -> bool:
        return self.account is None or account == self.account

    def csrf(self, tokens: Tokens, accounts: Mapping[str, Account]) -> str:
        return _mac(_key(tokens, self._label(), accounts) or "", "csrf|" + self.cookie)

    def _label(self) -> str:
        return self.cookie.partition(".")[0]


def _mac(key: str, message: str) -> str:
    return hmac.new(key.encode(), b"quota-dashboard|" + message.encode(), hashlib.sha256).hexdigest()


def _operator_secret(tokens: Tokens) -> str | None:
    return tokens.read or tokens.admin


def _account_of_label(label: str) -> str | None:
    encoded = label[len(ACCOUNT_PREFIX) :]
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _key(tokens: Tokens, label: str, accounts: Mapping[str, Account]) -> str | None:
    """The secret behind a cookie's first part, or None when nothing stands behind it any more."""
    if label == "admin":
        return tokens.admin
    if label == "read":
        return tokens.read
    if label.startswith(ACCOUNT_PREFIX):
        name = _account_of_label(label)
        account = accounts.get(name) if name is not None else None
        secret = _operator_secret(tokens)
        if account is None or account.dashboard_token_sha256 is None or secret is None:
            return None
        return f"{secret}|{account.dashboard_token_sha256}"
    return None


def _account_with_token(given: str, accounts: Mapping[str, Account]) -> Account | None:
    if len(given) < MIN_LENGTH:
        return None
    digest = hashlib.sha256(given.encode()).hexdigest().encode()
    found = None
    # Every account is compared, in constant time each, so timing says nothing about which matched.
    for account in accounts.values():
        if account.dashboard_token_sha256 is not None:
            if hmac.compare_digest(digest, account.dashboard_token_sha256.encode()):
                found = account
    return found


def issue(tokens: Tokens, given: str, accounts: Mapping[str, Account], now: float | None = None) -> Session | None:
    """A session for a valid token, or None. Each has a nonce of its own: a sign-out marks one
    cookie, and a sign-in again within the same second must not be given the cookie just ended."""
    expires = int(now if now is not None else time.time()) + LIFETIME_S
    nonce = secrets.token_hex(NONCE_BYTES)
    scope = tokens.scope_of(given)
    if scope is not None:
        body = f"{scope}.{expires}.{nonce}"
        return Session(scope, expires, f"{body}.{_mac(given, body)}")
    account = _account_with_token(given, accounts)
    if account is None:
        return None
    label = ACCOUNT_PREFIX + base64.urlsafe_b64encode(account.name.encode()).decode().rstrip("=")
    key = _key(tokens, label, accounts)
    if key is None:
        return None
    body = f"{label}.{expires}.{nonce}"
    return Session("account", expires, f"{body}.{_mac(key, body)}", account.name)


def verify(tokens: Tokens, cookie: str, accounts: Mapping[str, Account], now: float | None = None) -> Session | None:
    label, _, rest = cookie.partition(".")
    expires_text, _, rest = rest.partition(".")
    nonce, _, mac = rest.partition(".")
    key = _key(tokens, label, accounts)
    if key is None or not expires_text.isdigit() or len(expires_text) > 12 or len(nonce) != 2 * NONCE_BYTES:
        return None
    if not hmac.compare_digest(mac.encode(), _mac(key, f"{label}.{expires_text}.{nonce}").encode()):
        return None
    expires = int(expires_text)
    if expires <= (now if now is not None else time.time()):
        return None
    if label.startswith(ACCOUNT_PREFIX):
        return Session("account", expires, cookie, _account_of_label(label))
    return Session("admin" if label == "admin" else "read", expires, cookie)


def csrf_ok(tokens: Tokens, accounts: Mapping[str, Account], session: Session, given: str) -> bool:
    return hmac.compare_digest(given.encode(), session.csrf(tokens, accounts).encode())
