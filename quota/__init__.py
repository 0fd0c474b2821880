"""quota: hold every app of an IM service to its plan."""

from quota.config import Config, load_config
from quota.embed import install
from quota.entitlements import entitlements
from quota.errors import ConfigError, QuotaError, StorageError, UnknownAppError
from quota.middleware import QuotaMiddleware
from quota.store import store_from_url

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
