"""The Redis store: one EVALSHA of lua/program.lua per program, so a request costs one round trip.

redis-py's AsyncScript reloads the script after NOSCRIPT, so a Redis restart heals on its own.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from mypy_extensions import mypyc_attr
from redis.exceptions import RedisClusterException, RedisError

from quota.errors import StorageError
from quota.keys import names
from quota.store.program import (
    AddOp,
    BindOp,
    ClearOp,
    ConfirmOp,
    DrainOp,
    DropOp,
    LeaseOp,
    Op,
    Outcome,
    Program,
    RateOp,
    RateState,
    Refusal,
    ReleaseOp,
    RemoveOp,
    RenewOp,
    TombstoneOp,
    UndoOp,
    retry_after_ms,
)
from quota.store.wire import ReplyError, Script, Wire, array, bulk, bulks
from quota.tokens import masked_url

PROGRAM_LUA = resources.files("quota.store").joinpath("lua/program.lua").read_text(encoding="utf-8")
SWAP_LUA = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then redis.call('SADD', KEYS[1], ARGV[2]) return 1 end
return 0
"""
# Packed EVALSHA heads kept at most (one per route key: an app's client or user; see _packed).
HEADS_KEPT = 4096
# A dry run's marker, after the clock (see encode).
DRY = bulks(("?",))
ACCOUNTS_KEY = "q:{accounts}:records"
ACCOUNTS_VERSION_KEY = "q:{accounts}:version"


def encode(program: Program, now_ms: int, dry: bool = False) -> list[str | int]:
    args: list[str | int] = [now_ms, "?"] if dry else [now_ms]
    for op in program.ops:
        args.extend(_encode_op(op))
    return args


def _pairs(members: tuple[str, ...], fields: tuple[str, ...]) -> list[str]:
    fields = fields or ("",) * len(members)
    # Indexes, not zip(): zip with its strict keyword is a generic call in the compiled build.
    if len(fields) != len(members):
        raise ValueError(f"{len(members)} members and {len(fields)} claim fields")
    out: list[str] = []
    for i in range(len(members)):
        out += (members[i], fields[i])
    return out


def _encode_op(op: Op) -> list[str | int]:
    if isinstance(op, RateOp):
        return ["R", op.key, op.limit, op.window_ms, op.cost, int(op.exact)]
    if isinstance(op, AddOp):
        return [
            "A",
            op.owner_key,
            op.cap,
            op.pending_ttl_ms,
            op.reverse_prefix,
            op.reverse_cap,
            op.reverse_value,
            op.inflight_key,
            op.claim_ttl_ms,
            op.expire_s,
            op.member_drop,
            len(op.members),
            *_pairs(op.members, op.fields),
        ]
    if isinstance(op, UndoOp):
        return [
            "U",
            op.owner_key,
            op.reverse_prefix,
            op.reverse_value,
            op.inflight_key,
            len(op.members),
            *_pairs(op.members, op.fields),
        ]
    if isinstance(op, TombstoneOp):
        return ["T" if op.checked else "t", op.inflight_key, op.ttl_ms, int(op.symmetric), len(op.fields), *op.fields]
    if isinstance(op, ConfirmOp):
        return ["F", op.inflight_key, len(op.fields), *op.fields]
    if isinstance(op, ClearOp):
        return ["C", op.inflight_key, len(op.fields), *op.fields]
    if isinstance(op, RemoveOp):
        return ["X", op.owner_key, op.reverse_prefix, op.reverse_value, len(op.members), *op.members]
    if isinstance(op, DropOp):
        return ["D", op.owner_key, op.trash_key]
    if isinstance(op, DrainOp):
        return ["W", op.trash_key, op.reverse_prefix, op.value, op.batch]
    if isinstance(op, BindOp):
        return ["B", op.owner_key, op.placeholder, op.member, op.reverse_prefix, op.reverse_value]
    if isinstance(op, RenewOp):
        return ["N", op.key, op.ttl_ms, len(op.members), *op.members]
    if isinstance(op, LeaseOp):
        return [
            "O",
            op.online_key,
            op.peak_key,
            op.month,
            op.conn,
            op.ttl_ms,
            op.cap,
            op.share_bp,
            op.mau_last_key or op.online_key,
            op.mau_this_key or op.online_key,
            1 if op.recheck else 0,
        ]
    if isinstance(op, ReleaseOp):
        return ["Z", op.online_key, op.conn]
    raise TypeError(op)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def decode(program: Program, now_ms: int, reply: list[Any]) -> Outcome:
    """The script's reply: a status first; a refusal's details are decoded only for a refusal."""
    status: int = reply[0]
    if status == 0:
        text = _text
        index, kind, used, cap = int(reply[1]), text(reply[2]), int(reply[3]), int(reply[4])
        a, b, c, who = int(reply[5]), int(reply[6]), int(reply[7]), text(reply[8])
        if kind == "rate":
            op = program.ops[index]
            assert isinstance(op, RateOp)
            retry = retry_after_ms(a, b, c, op.window_ms, op.limit, op.cost)
            return Outcome(Refusal(index, kind, used, cap, retry_after_ms=retry, reset_ms=op.window_ms - c))
        if kind == "rlog":
            return Outcome(Refusal(index, "rate", used, cap, retry_after_ms=a, reset_ms=a))
        return Outcome(Refusal(index, kind, used, cap, room=a, who=who))
    # Integers arrive as ints and members as bytes (hiredis); decoded here, once, without layers.
    # Counts typed as ints: compiled, their arithmetic and the indexes they make are native.
    online: int = reply[1]
    remaining: int = reply[2]
    n_rates: int = reply[3]
    rates: tuple[RateState, ...] = ()
    if n_rates:
        states: list[RateState] = []
        for op in program.ops:
            if isinstance(op, RateOp):
                j = len(states)
                states.append(RateState(op.name, op.limit, reply[4 + 2 * j], reply[5 + 2 * j]))
                if j + 1 == n_rates:
                    break
        rates = tuple(states)
    pos = 4 + 2 * n_rates
    n_added: int = reply[pos]
    if not n_added:
        # Nothing added (a read): no lists to build.
        return Outcome(rates=rates, online=online, remaining=remaining)
    added: list[tuple[str, ...]] = []
    sizes: list[int] = []
    for _ in range(n_added):
        k: int = reply[pos + 1]
        sizes.append(reply[pos + 2])
        added.append(tuple(m.decode() for m in reply[pos + 3 : pos + 3 + k]))
        pos += 2 + k
    return Outcome(rates=rates, added=tuple(added), sizes=tuple(sizes), online=online, remaining=remaining)


SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")


def connect(url: str, timeout_ms: int) -> tuple[Any, list[Any]]:
    """A redis-py asyncio client for any of SCHEMES (the names `limits` uses for the same topologies).

    redis://host:port/db, rediss://..., unix:///path
    redis+cluster://host:port[,host:port...]          any reachable nodes; the slot map is discovered
    redis+sentinel://host:port[,host:port...]/service[/db]
    """
    timeout = timeout_ms / 1000
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry_on_timeout": False,
    }
    scheme, _, rest = url.partition("://")
    if scheme in ("redis", "rediss", "unix"):
        return aioredis.Redis.from_url(url, **options), []
    tls = scheme.startswith("rediss")
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    password = auth.partition(":")[2] or None if auth else None
    nodes = [(h.rpartition(":")[0] or h, int(h.rpartition(":")[2] or 6379)) for h in hosts.split(",") if h]
    if scheme.endswith("+cluster"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],
            password=password,
            ssl=tls,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # No retry (redis-py's cluster retries 3 times by default): a script whose reply was
            # lost may have run, and run again it would confirm or undo another request's claim.
            retry=Retry(NoBackoff(), 0),
        )
        return cluster, []
    from redis.asyncio.sentinel import Sentinel

    service, _, db = path.partition("/")
    if not service:
        raise ValueError(
            f"{masked_url(url)}: redis+sentinel needs a service name: redis+sentinel://host:port/<service>"
        )
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        nodes, sentinel_kwargs={"socket_timeout": timeout}, password=password, ssl=tls, **options
    )
    # The sentinels' own connections are closed with the store.
    return sentinel.master_for(service, db=int(db or 0)), list(sentinel.sentinels)


# Claims a forget deletes per command: a hash of many in flight is not deleted in one long one.
FORGET_SLICE = 500


# Compiled (quota/build.py), and open to subclasses: a store that wraps it adds counting or faults.
@mypyc_attr(allow_interpreted_subclasses=True)
class RedisStore:
    """Programs run as one EVALSHA: on a single server through the lean pipelined Wire, on Cluster and
    Sentinel through redis-py (which follows slot moves and failovers). Everything else: redis-py."""

    def __init__(self, url: str, *, timeout_ms: int = 250, client: Any = None) -> None:
        # The lean connection serves single servers reached by URL; Cluster, Sentinel and a client
        # handed in keep redis-py, which follows slot moves and failovers.
        plain = url.split("://", 1)[0] in ("redis", "rediss", "unix") and client is None
        self.extra: list[Any] = []
        if client is None:
            client, self.extra = connect(url, timeout_ms)
        self.client = client
        self.script = self.client.register_script(PROGRAM_LUA)
        self.wire = Wire(url, timeout_ms=timeout_ms) if plain else None
        self.program = Script(PROGRAM_LUA)
        # A program's route key -> its packed EVALSHA head (see _packed).
        self._heads: dict[str, bytes] = {}
        # Always a pair: the clock and its encoding (-1 is a clock like any other).
        self._clock_ms = -1
        self._clock = bulk(b"-1")
        self.swap = self.client.register_script(SWAP_LUA)

    async def run(self, program: Program, now_ms: int, dry: bool = False) -> Outcome:
        if not program:
            return Outcome()
        try:
            wire = self.wire
            if wire is not None:
                # Wire.evalsha's steps inline: one coroutine fewer between a request and its reply.
                packed = self._packed(program, now_ms, dry)
                sent = wire.send(packed)
                reply = await (sent if sent is not None else wire.call(packed))
                if isinstance(reply, ReplyError):
                    reply = await wire.recovered(self.program, packed, reply)
            else:
                reply = await self.script(keys=[program.route_key()], args=encode(program, now_ms, dry))
        # A cluster with every node down, or a slot no node covers, raises RedisClusterException,
        # which is no RedisError: an outage all the same (policy, breaker), never a 500.
        except (RedisError, RedisClusterException, OSError, ReplyError) as exc:
            failed = StorageError(f"redis: {exc.__class__.__name__}: {exc}")
            # Carried over, not read through __cause__: compiled, `raise ... from` sets none.
            failed.event = getattr(exc, "event", 0)
            raise failed from exc
        return decode(program, now_ms, reply)

    def _packed(self, program: Program, now_ms: int, dry: bool) -> bytes:
        # EVALSHA sha 1 key now_ms ["?"] ops...: all but the clock is the same each time a shared
        # program runs, and packed once; the head (up to the key) is shared by the app's programs.
        base = program.base
        extra = b""
        if base is None:
            count, head, tail = self._kept(program)
        else:
            # A (shared) program with the app's waiting confirms after it: its own encoding, kept,
            # then the confirms' alone. Its route key is the base's: the base's ops come first.
            count, head, tail = self._kept(base)
            args: list[str | int] = []
            for op in program.ops[len(base.ops) :]:
                args.extend(_encode_op(op))
            count, extra = count + len(args), bulks(args)
        clock = self._clock
        if now_ms != self._clock_ms:
            # Requests come many to a millisecond under load: the clock's encoding is shared.
            clock = self._clock = bulk(str(now_ms).encode())
            self._clock_ms = now_ms
        if dry:
            return b"".join((array(count + 1), head, clock, DRY, tail, extra))
        return b"".join((array(count), head, clock, tail, extra))

    def _kept(self, program: Program) -> tuple[int, bytes, bytes]:
        """A program's argument count, EVALSHA head and packed ops (less the clock), kept on it."""
        cached = program.packed
        if cached is None:
            args: list[str | int] = []
            for op in program.ops:
                args.extend(_encode_op(op))
            key = program.route_key()
            head = self._heads.get(key)
            if head is None:
                if len(self._heads) >= HEADS_KEPT:
                    self._heads.clear()
                head = self._heads[key] = bulks(("EVALSHA", self.program.sha, 1, key))
            cached = program.packed = (5 + len(args), head, bulks(args))
        return cached

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StorageError(f"redis: {exc.__class__.__name__}: {exc}") from exc

    async def cardinalities(self, keys: list[str]) -> list[int]:
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.scard(key)
        return [int(n) for n in await self._call(pipe.execute())]

    async def members(self, key: str) -> set[str]:
        return {m.decode() for m in await self._call(self.client.smembers(key))}

    async def online(self, key: str, now_ms: int) -> int:
        return int(await self._call(self.client.zcount(key, now_ms + 1, "+inf")))

    async def peaks(self, key: str) -> dict[str, int]:
        raw = await self._call(self.client.hgetall(key))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def load_accounts(self) -> tuple[int, dict[str, dict[str, Any]]]:
        # Version first, then records: a write in between only makes the next poll reload again.
        pipe = self.client.pipeline(transaction=False)
        pipe.get(ACCOUNTS_VERSION_KEY)
        pipe.hgetall(ACCOUNTS_KEY)
        version, raw = await self._call(pipe.execute())
        return int(version or 0), {k.decode(): json.loads(v) for k, v in raw.items()}

    async def save_account(self, name: str, record: dict[str, Any]) -> int:
        # Records first, then the version that tells other processes to reload.
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(ACCOUNTS_KEY, name, json.dumps(record))
        pipe.incr(ACCOUNTS_VERSION_KEY)
        _, version = await self._call(pipe.execute())
        return int(version)

    async def claim_once(self, key: str, ttl_s: int) -> bool:
        return bool(await self._call(self.client.set(key, b"1", nx=True, ex=ttl_s)))

    async def claimed(self, key: str) -> bool:
        return bool(await self._call(self.client.exists(key)))

    async def delete_account(self, name: str) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.hdel(ACCOUNTS_KEY, name)
        pipe.incr(ACCOUNTS_VERSION_KEY)
        _, version = await self._call(pipe.execute())
        return int(version)

    async def accounts_version(self) -> int:
        return int(await self._call(self.client.get(ACCOUNTS_VERSION_KEY)) or 0)

    async def scan_prefix(self, prefix: str) -> list[str]:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        return [k.decode() async for k in self.client.scan_iter(match=pattern, count=1000)]

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            await self._call(self.client.delete(key))

    async def forget_claims(self, key: str, entity: str, owner: bool, member: bool) -> int:
        try:
            fields = [f.decode() async for f, _ in self.client.hscan_iter(key, count=1000)]
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StorageError(f"redis: {exc.__class__.__name__}: {exc}") from exc
        gone = [f for f in fields if names(f, entity, owner, member)]
        for i in range(0, len(gone), FORGET_SLICE):
            await self._call(self.client.hdel(key, *gone[i : i + FORGET_SLICE]))
            await self._call(self.client.zrem(key + ":due", *gone[i : i + FORGET_SLICE]))
        return len(gone)

    async def add_members(self, key: str, members: list[str]) -> None:
        if members:
            await self._call(self.client.sadd(key, *members))

    async def remove_members(self, key: str, members: list[str]) -> int:
        return int(await self._call(self.client.srem(key, *members))) if members else 0

    async def swap_member(self, key: str, old: str, new: str) -> bool:
        return bool(await self._call(self.swap(keys=[key], args=[old, new])))

    async def close(self) -> None:
        if self.wire is not None:
            await self.wire.close()
        await self.client.aclose()
        for other in self.extra:
            await other.aclose()
