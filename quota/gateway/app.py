"""Routes and bodies of the reference gateway, shaped like the vendor's (reference §1, §2, §5)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

USER_BATCH = 60


@dataclass
class AppState:
    users: dict[str, float] = field(default_factory=dict)
    contacts: dict[str, set[str]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    chatrooms: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        """The gateway's own truth, for `quota reconcile`."""
        return {
            "users": sorted(self.users),
            "contacts": {u: sorted(fs) for u, fs in self.contacts.items() if fs},
            "groups": {g: sorted(v["members"]) for g, v in self.groups.items()},
            "chatrooms": {c: sorted(v["members"]) for c, v in self.chatrooms.items()},
        }


class ApiError(Exception):
    def __init__(self, status: int, error: str, description: str, exception: str = "EasemobException") -> None:
        self.status, self.error, self.description, self.exception = status, error, description, exception


USER_ID = r"(?!\.\.?$)[a-z0-9_.\-]{1,64}"


def _not_found(what: str) -> ApiError:
    return ApiError(
        404, "service_resource_not_found", f"Service resource not found: {what}", "ServiceResourceNotFoundException"
    )


class Gateway:
    def __init__(self, user_id: str = USER_ID) -> None:
        self.apps: dict[str, AppState] = {}
        self.user_id = re.compile(user_id)

    def uid(self, value: object) -> str:
        """A user id the vendor's way: case-insensitive, 1-64 characters of a-z 0-9 _ - . once folded."""
        if not isinstance(value, str):
            raise ApiError(400, "illegal_argument", "username must be a string")
        folded = value.lower() if value.isascii() else value
        if not self.user_id.fullmatch(folded):
            raise ApiError(400, "illegal_argument", f"username must match {self.user_id.pattern}")
        return folded

    def state(self, request: Request) -> AppState:
        key = f"{request.path_params['org']}#{request.path_params['app']}"
        return self.apps.setdefault(key, AppState())

    def ok(self, request: Request, started: float, **extra: Any) -> JSONResponse:
        org, app = request.path_params["org"], request.path_params["app"]
        body = {
            "action": request.method.lower(),
            "application": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{org}#{app}")),
            "applicationName": app,
            "organization": org,
            "path": request.url.path.split(f"/{org}/{app}", 1)[-1],
            "uri": str(request.url),
            "timestamp": int(time.time() * 1000),
            "duration": int((time.time() - started) * 1000),
        }
        body.update(extra)
        return JSONResponse(body)

    # Users
    async def register(self, request: Request, st: AppState, started: float) -> Response:
        payload = await _json(request)
        items = payload if isinstance(payload, list) else [payload]
        if not items or len(items) > USER_BATCH:
            raise ApiError(400, "illegal_argument", f"register 1 to {USER_BATCH} users per call")
        names = []
        for item in items:
            name = self.uid(item.get("username") if isinstance(item, dict) else None)
            if name in st.users or name in names:
                raise ApiError(
                    400,
                    "duplicate_unique_property_exists",
                    f"Application null Entity user requires that property named username be unique, "
                    f"value of {name} exists",
                    "DuplicateUniquePropertyExistsException",
                )
            names.append(name)
        now = time.time()
        for name in names:
            st.users[name] = now
        return self.ok(request, started, entities=[_user(n, now) for n in names])

    async def list_users(self, request: Request, st: AppState, started: float) -> Response:
        limit = _limit(request, 10, 1000)
        users = sorted(st.users, key=st.users.__getitem__)[:limit]
        return self.ok(request, started, entities=[_user(u, st.users[u]) for u in users], count=len(users))

    async def get_user(self, request: Request, st: AppState, started: float) -> Response:
        name = self.uid(request.path_params["username"])
        if name not in st.users:
            raise _not_found(f"user {name}")
        return self.ok(request, started, entities=[_user(name, st.users[name])])

    def _forget(self, st: AppState, name: str) -> None:
        del st.users[name]
        for friend in st.contacts.pop(name, set()):
            st.contacts.get(friend, set()).discard(name)
        for rooms in (st.groups, st.chatrooms):
            for room in rooms.values():
                room["members"].discard(name)

    async def delete_user(self, request: Request, st: AppState, started: float) -> Response:
        name = self.uid(request.path_params["username"])
        if name not in st.users:
            raise _not_found(f"user {name}")
        created = st.users[name]
        self._forget(st, name)
        return self.ok(request, started, entities=[_user(name, created)])

    async def delete_users(self, request: Request, st: AppState, started: float) -> Response:
        limit = _limit(request, 1, 100)
        oldest = sorted(st.users, key=st.users.__getitem__)[:limit]
        entities = [_user(n, st.users[n]) for n in oldest]
        for name in oldest:
            self._forget(st, name)
        return self.ok(request, started, entities=entities)

    async def token(self, request: Request, st: AppState, started: float) -> Response:
        payload = await _json(request)
        name = self.uid(payload.get("username") if isinstance(payload, dict) else None)
        if name not in st.users:
            raise ApiError(404, "service_resource_not_found", "user not found", "UserNotFoundException")
        return JSONResponse(
            {"access_token": "YWMt" + uuid.uuid4().hex, "expires_in": 86400, "user": _user(name, st.users[name])}
        )

    # Contacts
    async def add_contact(self, request: Request, st: AppState, started: float) -> Response:
        owner, friend = self.uid(request.path_params["owner"]), self.uid(request.path_params["friend"])
        for name in (owner, friend):
            if name not in st.users:
                raise _not_found(f"user {name}")
        if owner == friend:
            raise ApiError(400, "illegal_argument", "a user cannot add themself")
        st.contacts.setdefault(owner, set()).add(friend)
        st.contacts.setdefault(friend, set()).add(owner)
        return self.ok(request, started, entities=[_user(friend, st.users[friend])])

    async def remove_contact(self, request: Request, st: AppState, started: float) -> Response:
        owner, friend = self.uid(request.path_params["owner"]), self.uid(request.path_params["friend"])
        if friend not in st.contacts.get(owner, set()):
            raise _not_found(f"contact {friend}")
        st.contacts[owner].discard(friend)
        st.contacts.get(friend, set()).discard(owner)
        return self.ok(request, started, entities=[_user(friend, st.users.get(friend, 0))])

    async def list_contacts(self, request: Request, st: AppState, started: float) -> Response:
        owner = self.uid(request.path_params["owner"])
        if owner not in st.users:
            raise _not_found(f"user {owner}")
        friends = sorted(st.contacts.get(owner, set()))
        return self.ok(request, started, data=friends, count=len(friends))

    # Groups and chatrooms share their shapes; `kind` picks the table and the id field.
    def _rooms(self, st: AppState, kind: str) -> dict[str, dict[str, Any]]:
        return st.groups if kind == "chatgroups" else st.chatrooms

    def _room(self, request: Request, st: AppState, kind: str) -> dict[str, Any]:
        rid = request.path_params["room_id"]
        room = self._rooms(st, kind).get(rid)
        if room is None:
            raise _not_found(f"{kind} {rid}")
        return room

    async def create_room(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        payload = await _json(request)
        if not isinstance(payload, dict):
            raise ApiError(400, "illegal_argument", "owner is required")
        owner = self.uid(payload.get("owner"))
        if owner not in st.users:
            raise _not_found(f"user {owner}")
        rid = str(uuid.uuid4().int)[:15]
        self._rooms(st, kind)[rid] = {
            "name": str(payload.get("groupname") or payload.get("name") or rid),
            "owner": owner,
            # The owner is a member, as the vendor counts it (maxusers includes the owner).
            "members": {owner},
        }
        return self.ok(request, started, data={"groupid": rid} if kind == "chatgroups" else {"id": rid})

    async def get_room(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        room = self._room(request, st, kind)
        rid = request.path_params["room_id"]
        return self.ok(
            request,
            started,
            data=[
                {"id": rid, "name": room["name"], "owner": room["owner"], "affiliations_count": len(room["members"])}
            ],
        )

    async def delete_room(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        self._room(request, st, kind)
        del self._rooms(st, kind)[request.path_params["room_id"]]
        return self.ok(request, started, data={"success": True, "id": request.path_params["room_id"]})

    async def room_members(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        room = self._room(request, st, kind)
        return self.ok(request, started, data=[{"member": m} for m in sorted(room["members"])])

    def _join(self, st: AppState, room: dict[str, Any], names: list[str]) -> None:
        for name in names:
            if name not in st.users:
                raise _not_found(f"user {name}")
        room["members"].update(names)

    async def add_room_member(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        room = self._room(request, st, kind)
        name = self.uid(request.path_params["username"])
        self._join(st, room, [name])
        return self.ok(request, started, data={"result": True, "user": name})

    async def add_room_members(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        room = self._room(request, st, kind)
        payload = await _json(request)
        names = payload.get("usernames") if isinstance(payload, dict) else None
        if not isinstance(names, list) or len(names) > 60:
            raise ApiError(400, "illegal_argument", "usernames must be a list of at most 60 user ids")
        names = [self.uid(n) for n in names]
        self._join(st, room, names)
        return self.ok(request, started, data={"newmembers": names})

    async def remove_room_members(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        room = self._room(request, st, kind)
        names = [self.uid(n) for n in request.path_params["usernames"].split(",")]
        # The owner stays, with result false, as the vendor answers (it cannot be removed).
        removed = [n for n in names if n in room["members"] and n != room["owner"]]
        if not removed:
            raise ApiError(400, "illegal_argument", "none of these users can be removed: not members, or the owner")
        room["members"].difference_update(removed)
        return self.ok(request, started, data=[{"result": n in removed, "user": n} for n in names])

    async def joined(self, request: Request, st: AppState, started: float, kind: str) -> Response:
        name = self.uid(request.path_params["username"])
        rooms = [rid for rid, r in self._rooms(st, kind).items() if name in r["members"]]
        return self.ok(request, started, data=[{"groupid" if kind == "chatgroups" else "id": r} for r in rooms])

    # Messages and the features of higher plans
    async def send_message(self, request: Request, st: AppState, started: float) -> Response:
        payload = await _json(request)
        targets = payload.get("to") if isinstance(payload, dict) else None
        if not isinstance(targets, list) or not targets:
            raise ApiError(400, "illegal_argument", "to must be a non-empty list")
        return self.ok(request, started, data={str(t): uuid.uuid4().hex[:18] for t in targets})

    async def history(self, request: Request, st: AppState, started: float) -> Response:
        hour = request.path_params["hour"]
        return self.ok(
            request,
            started,
            data=[{"url": f"https://files.invalid/{hour}.gz", "Expires": int(time.time() * 1000) + 3_600_000}],
        )

    async def accept(self, request: Request, st: AppState, started: float) -> Response:
        payload = await _json(request, allow_empty=True)
        st.settings[request.url.path] = payload
        return self.ok(request, started, data={"accepted": True})

    async def state_dump(self, request: Request, st: AppState, started: float) -> Response:
        return JSONResponse(st.snapshot())


async def _json(request: Request, allow_empty: bool = False) -> Any:
    raw = await request.body()
    if not raw and allow_empty:
        return None
    try:
        import json

        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # nesting deeper than the parser goes, too
        raise ApiError(400, "illegal_argument", "request body is not valid JSON") from exc


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit", "")
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise ApiError(400, "illegal_argument", f"limit must be a whole number from 1 to {most}")
    return int(raw)


def _user(name: str, created: float) -> dict[str, Any]:
    ms = int(created * 1000)
    return {
        "uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, name)),
        "type": "user",
        "created": ms,
        "modified": ms,
        "username": name,
        "activated": True,
    }


Handler = Callable[..., Awaitable[Response]]


def create_gateway(user_id: str = USER_ID) -> Starlette:
    """The reference gateway; `user_id` is the pattern its user ids must match once folded."""
    gw = Gateway(user_id)

    def endpoint(handler: Handler, **kw: str) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            started = time.time()
            try:
                return await handler(request, gw.state(request), started, **kw)
            except ApiError as err:
                return JSONResponse(
                    {
                        "error": err.error,
                        "exception": err.exception,
                        "timestamp": int(time.time() * 1000),
                        "duration": int((time.time() - started) * 1000),
                        "error_description": err.description,
                    },
                    status_code=err.status,
                )

        return run

    async def connection(ws: WebSocket) -> None:
        st = gw.apps.setdefault(f"{ws.path_params['org']}#{ws.path_params['app']}", AppState())
        name = ws.path_params["username"]
        folded = name.lower() if name.isascii() else name
        if folded not in st.users:
            await ws.close(code=1008, reason="user not found")
            return
        await ws.accept()
        try:
            while True:
                text = await ws.receive_text()
                await ws.send_text(text)
        except WebSocketDisconnect:
            return

    base = "/{org}/{app}"
    routes: list[Any] = [
        Route(base + "/users", endpoint(gw.register), methods=["POST"]),
        Route(base + "/users", endpoint(gw.list_users), methods=["GET"]),
        Route(base + "/users", endpoint(gw.delete_users), methods=["DELETE"]),
        Route(base + "/users/{username}", endpoint(gw.get_user), methods=["GET"]),
        Route(base + "/users/{username}", endpoint(gw.delete_user), methods=["DELETE"]),
        Route(base + "/token", endpoint(gw.token), methods=["POST"]),
        Route(base + "/users/{owner}/contacts/users/{friend}", endpoint(gw.add_contact), methods=["POST"]),
        Route(base + "/users/{owner}/contacts/users/{friend}", endpoint(gw.remove_contact), methods=["DELETE"]),
        Route(base + "/users/{owner}/contacts/users", endpoint(gw.list_contacts), methods=["GET"]),
        Route(base + "/messages/users", endpoint(gw.send_message), methods=["POST"]),
        Route(base + "/messages/chatgroups", endpoint(gw.send_message), methods=["POST"]),
        Route(base + "/messages/chatrooms", endpoint(gw.send_message), methods=["POST"]),
        Route(base + "/messages/recall", endpoint(gw.accept), methods=["POST"]),
        Route(base + "/messages/translate", endpoint(gw.accept), methods=["POST"]),
        Route(base + "/messages/report", endpoint(gw.accept), methods=["POST"]),
        Route(base + "/chatmessages/{hour}", endpoint(gw.history), methods=["GET"]),
        Route(base + "/callbacks", endpoint(gw.accept), methods=["PUT"]),
        Route(base + "/callbacks/{kind}", endpoint(gw.accept), methods=["PUT"]),
        Route(base + "/moderation/{kind}", endpoint(gw.accept), methods=["PUT"]),
        Route(base + "/chatgroups/{room_id}/read_receipts", endpoint(gw.accept), methods=["POST"]),
        Route(base + "/_state", endpoint(gw.state_dump), methods=["GET"]),
        WebSocketRoute(base + "/users/{username}/connection", connection),
    ]
    for kind in ("chatgroups", "chatrooms"):
        room = base + f"/{kind}/{{room_id}}"
        routes += [
            Route(base + f"/{kind}", endpoint(gw.create_room, kind=kind), methods=["POST"]),
            Route(room, endpoint(gw.get_room, kind=kind), methods=["GET"]),
            Route(room, endpoint(gw.delete_room, kind=kind), methods=["DELETE"]),
            Route(room + "/users", endpoint(gw.room_members, kind=kind), methods=["GET"]),
            Route(room + "/users", endpoint(gw.add_room_members, kind=kind), methods=["POST"]),
            Route(room + "/users/{username}", endpoint(gw.add_room_member, kind=kind), methods=["POST"]),
            Route(room + "/users/{usernames}", endpoint(gw.remove_room_members, kind=kind), methods=["DELETE"]),
            Route(base + f"/users/{{username}}/joined_{kind}", endpoint(gw.joined, kind=kind), methods=["GET"]),
        ]
    app = Starlette(routes=routes)
    app.state.gateway = gw
    return app
