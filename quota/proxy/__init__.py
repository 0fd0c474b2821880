"""`quota proxy`: QuotaMiddleware in front of any HTTP gateway, over the network.

The middleware never imports this package; it wraps ProxyApp as it wraps any ASGI app.
"""

from quota.proxy.app import ProxyApp, Upstream
from quota.proxy.errors import UpstreamBroken

__all__ = ["ProxyApp", "Upstream", "UpstreamBroken"]
