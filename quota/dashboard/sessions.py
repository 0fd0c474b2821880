"""Dashboard sessions: a token given once at the login form becomes a signed, expiring cookie.

The cookie is `<scope>.<expires>.<mac>`, the mac an HMAC-SHA256 keyed by the token of that scope.
Nothing is kept in the process, so every worker accepts it, and rotating a token ends every
session made with it. The token itself never leaves the login form's body: not in a URL, not in
the cookie. The cookie is HttpOnly (no script reads it) and SameSite=Strict (no other site's page
sends it), and each state-changing form (logout) also carries a token derived from the session.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from quota.tokens import Scope, Tokens

COOKIE = "quota_dashboard"
LIFETIME_S = 8 * 3600


@dataclass(frozen=True)
class Session:
    scope: Scope
    expires: int
    cookie: str

    @property
    def sees_all_apps(self) -> bool:
        # Both scopes today are the operators' own; a customer scope would name its account here.
        return True

    def csrf(self, tokens: Tokens) -> str:
        return _mac(_key(tokens, self.scope) or "", "csrf|" + self.cookie)


def _key(tokens: Tokens, scope: str) -> str | None:
    return tokens.admin if scope == "admin" else tokens.read if scope == "read" else None


def _mac(key: str, message: str) -> str:
    return hmac.new(key.encode(), b"quota-dashboard|" + message.encode(), hashlib.sha256).hexdigest()


def issue(tokens: Tokens, given: str, now: float | None = None) -> Session | None:
    """A session for a valid token, or None."""
    scope = tokens.scope_of(given)
    if scope is None:
        return None
    expires = int(now if now is not None else time.time()) + LIFETIME_S
    body = f"{scope}.{expires}"
    return Session(scope, expires, f"{body}.{_mac(given, body)}")


def verify(tokens: Tokens, cookie: str, now: float | None = None) -> Session | None:
    scope, _, rest = cookie.partition(".")
    expires_text, _, mac = rest.partition(".")
    key = _key(tokens, scope)
    if key is None or not expires_text.isdigit() or len(expires_text) > 12:
        return None
    if not hmac.compare_digest(mac.encode(), _mac(key, f"{scope}.{expires_text}").encode()):
        return None
    expires = int(expires_text)
    if expires <= (now if now is not None else time.time()):
        return None
    return Session("admin" if scope == "admin" else "read", expires, cookie)


def csrf_ok(tokens: Tokens, session: Session, given: str) -> bool:
    return hmac.compare_digest(given.encode(), session.csrf(tokens).encode())
