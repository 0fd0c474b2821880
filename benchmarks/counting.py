"""Counts the Redis commands a process's clients send (round trips' worth of top-level commands),
by wrapping redis-py's command packers: quota, limits and slowapi all talk through them."""

from __future__ import annotations

from typing import Any

SENT = [0]


def install() -> None:
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    def wrap_one(cls: Any) -> None:
        original = cls.pack_command

        def pack_command(self: Any, *args: Any) -> Any:
            SENT[0] += 1
            return original(self, *args)

        cls.pack_command = pack_command

    # Async connections pack each command (pipelines included) through pack_command; sync ones go
    # through their serializer's pack, one call per command.
    wrap_one(aconn.AbstractConnection)
    for serializer in (sconn.HiredisRespSerializer, sconn.PythonRespSerializer):
        original = serializer.pack

        def pack(self: Any, *args: Any, _original: Any = original) -> Any:
            SENT[0] += 1
            return _original(self, *args)

        serializer.pack = pack  # type: ignore[method-assign]
