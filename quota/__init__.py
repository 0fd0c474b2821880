"""quota: hold every app of an IM service to its plan."""

from typing import TYPE_CHECKING, Any

from quota.config import Config, load_config
from quota.entitlements import entitlements
from quota.errors import ConfigError, QuotaError, StorageError, UnknownAppError
from quota.middleware import QuotaMiddleware
from quota.store import store_from_url

if TYPE_CHECKING:
    from quota.embed import install


def __getattr__(name: str) -> Any:
    # install() brings the admin API, dashboard and probes with it: load them only when asked for,
    # so importing the middleware keeps the request path lean.
    if name == "install":
        from quota.embed import install

        return install
    raise AttributeError(f"module 'quota' has no attribute {name!r}")


__all__ = [
    "Config",
    "ConfigError",
    "QuotaError",
    "QuotaMiddleware",
    "StorageError",
    "UnknownAppError",
    "entitlements",
    "install",
    "load_config",
    "store_from_url",
]
