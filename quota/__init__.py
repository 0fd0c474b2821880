"""quota: hold every app of an IM service to its plan."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quota")
except PackageNotFoundError:  # pragma: no cover - a checkout used without installing
    __version__ = "0+unknown"

from quota.config import Config, load_config
from quota.entitlements import entitlements
from quota.errors import ConfigError, QuotaError, StorageError, UnknownAppError
from quota.middleware import QuotaMiddleware
from quota.store import store_from_url

# The application-code API (quota/api.py) loads on first use: importing the middleware does not pull it in.
_API = ("Quota", "Usage", "Decision", "PlanInfo", "Explanation", "UsageReport", "RateCheck", "CounterCheck")


def __getattr__(name: str) -> object:
    if name in _API:
        from quota import api

        return getattr(api, name)
    raise AttributeError(f"module 'quota' has no attribute {name!r}")


__all__ = [
    *_API,
    "Config",
    "ConfigError",
    "QuotaError",
    "QuotaMiddleware",
    "StorageError",
    "UnknownAppError",
    "entitlements",
    "load_config",
    "store_from_url",
]
