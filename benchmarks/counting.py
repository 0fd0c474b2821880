"""Counts the Redis commands a process's clients send (round trips' worth of top-level commands),
by wrapping redis-py's command packers (limits and slowapi talk through them, and so does quota for
all but its request path), plus what quota's lean connection (quota/store/wire.py) counts itself."""

from __future__ import annotations

from typing import Any

SENT = [0]
# The lean connections of the middlewares in this process: compiled, they count their own commands.
WIRES: list[Any] = []


def watch(middleware: Any) -> None:
    wire = getattr(middleware.runtime.store, "wire", None)
    if wire is not None:
        WIRES.append(wire)


def sent() -> int:
    return SENT[0] + sum(int(wire.sent) for wire in WIRES)


def install() -> None:
    import hiredis
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    def wrap_one(cls: Any) -> None:
        original = cls.pack_command

        def pack_command(self: Any, *args: Any) -> Any:
            SENT[0] += 1
            return original(self, *args)

        cls.pack_command = pack_command

    # Async redis-py packs each command (pipelines included) in pack_command, in Python; sync
    # redis-py packs through hiredis.pack_command (or PythonRespSerializer without hiredis): one
    # call per command in each case.
    wrap_one(aconn.AbstractConnection)
    original_pack = hiredis.pack_command

    def pack_command(args: Any) -> Any:
        SENT[0] += 1
        return original_pack(args)

    hiredis.pack_command = pack_command  # type: ignore[assignment]
    python_pack: Any = sconn.PythonRespSerializer.pack

    def pack(self: Any, *args: Any) -> Any:
        SENT[0] += 1
        return python_pack(self, *args)

    sconn.PythonRespSerializer.pack = pack  # type: ignore[method-assign]
