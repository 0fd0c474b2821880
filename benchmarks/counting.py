"""Counts the Redis commands a process's clients send (round trips' worth of top-level commands),
by wrapping redis-py's command packers: quota, limits and slowapi all talk through them."""

from __future__ import annotations

from typing import Any

SENT = [0]


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
    # redis-py packs through hiredis.pack_command (or PythonRespSerializer without hiredis), and so
    # does quota's own connection (quota/store/wire.py): one call per command in each case.
    wrap_one(aconn.AbstractConnection)
    original_pack = hiredis.pack_command

    def pack_command(args: Any) -> Any:
        SENT[0] += 1
        return original_pack(args)

    hiredis.pack_command = pack_command
    python_pack = sconn.PythonRespSerializer.pack

    def pack(self: Any, *args: Any) -> Any:
        SENT[0] += 1
        return python_pack(self, *args)

    sconn.PythonRespSerializer.pack = pack  # type: ignore[method-assign]
