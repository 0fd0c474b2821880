"""Secrets kept out of what quota shows: URLs in log lines and config errors."""

from __future__ import annotations

import pytest

from quota.tokens import masked_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@db:6379/0", "redis://:***@db:6379/0"),
        ("redis://app:hunter2@db:6379/0?ssl_cert_reqs=none", "redis://app:***@db:6379/0?***"),
        ("https://hooks.example/in?token=hunter2", "https://hooks.example/in?***"),
        ("https://hooks.example/in", "https://hooks.example/in"),
        ("http://[::1/h?token=hunter2", "http://***"),
    ],
)
def test_a_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    """Catches a password or a query token (a store's, a webhook receiver's) written into a log line
    or a config error."""
    assert masked_url(url) == shown
