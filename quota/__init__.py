"""quota: hold every app of an IM service to its plan."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("quota")
except PackageNotFoundError:  # pragma: no cover - a checkout used without installing
    __version__ = "0+unknown"
from typing import TYPE_CHECKING, Any

# First: it decides whether the request path's modules load compiled or from source.
from quota.build import BUILD
from quota.config import Config, load_config
from quota.entitlements import entitlements
from quota.errors import ConfigError, QuotaError, StorageError, UnknownAppError
from quota.middleware import QuotaMiddleware
from quota.store import store_from_url

# The application-code API (quota/api.py) and install() (admin API, dashboard, probes) load on first
# use: importing the middleware keeps the request path lean.
_API = ("Quota", "Usage", "Decision", "PlanInfo", "Explanation", "UsageReport", "RateCheck", "CounterCheck")

if TYPE_CHECKING:
    from quota.embed import install


def __getattr__(name: str) -> Any:
    if name in _API:
        from quota import api

        return getattr(api, name)
    if name == "install":
        from quota.embed import install

        return install
    raise AttributeError(f"module 'quota' has no attribute {name!r}")


__all__ = [
    *_API,
    "BUILD",
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
