"""A reference IM REST gateway: a test double of the vendor's REST API, state in memory.

Kept apart from the middleware (which never imports it). It does not authenticate callers.
"""

from quota.gateway.app import create_gateway

__all__ = ["create_gateway"]
