"""Exceptions raised by quota.

QuotaError
 ├── ConfigError      a config file does not validate; carries every Problem found
 ├── UnknownAppError  no account holds this appkey
 ├── ConflictError    a change contradicts what it applies to (an app another account holds, a plan in force)
 └── StorageError     the store did not answer (timeout, connection, script error)
"""

from __future__ import annotations

from dataclasses import dataclass


class QuotaError(Exception):
    pass


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: expected {self.expected}, found {self.found}"


class ConfigError(QuotaError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UnknownAppError(QuotaError):
    def __init__(self, appkey: str) -> None:
        self.appkey = appkey
        super().__init__(f"unknown app {appkey!r}: no account in the configuration holds it")


class StorageError(QuotaError):
    # The store's own failure this one stands for (quota.store.wire): the calls one failure fails
    # share it, and count once toward the breaker. 0: none in particular.
    event = 0


class ConflictError(QuotaError):
    pass
