"""A FastAPI IM gateway held to its plans by quota, in one call, using quota's API in its own routes.

    pip install quota fastapi
    QUOTA_ADMIN_TOKEN=$(python3 -c "import secrets; print(secrets.token_urlsafe(24))") uvicorn examples.fastapi_app:app

Set QUOTA_REDIS_URL to share counters between processes; without it the store is in memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect

import quota
from quota.dependencies import from_query, requires_feature, within_limit

app = FastAPI(title="IM gateway")
users: dict[str, set[str]] = {}
middleware = quota.install(app, config=os.environ.get("QUOTA_CONFIG"), redis_url=os.environ.get("QUOTA_REDIS_URL"))


@app.post("/{org}/{app_name}/users")
async def register(org: str, app_name: str, body: list[dict[str, Any]]) -> dict[str, Any]:
    for item in body:
        users.setdefault(str(item["username"]).lower(), set())
    return {"entities": [{"username": item["username"]} for item in body]}


@app.post("/{org}/{app_name}/users/{owner}/contacts/users/{friend}")
async def add_friend(org: str, app_name: str, owner: str, friend: str) -> dict[str, Any]:
    users.setdefault(owner.lower(), set()).add(friend.lower())
    users.setdefault(friend.lower(), set()).add(owner.lower())
    return {"entities": [{"username": friend}]}


# The app's own routes, outside the REST route map (under no app, so the middleware applies only the
# general per-IP rate): they ask quota's API what the plan allows, and refuse in quota's terms.
# They read the app from the query for brevity; a real gateway takes it from the caller's
# credentials (appkey= a function of the request), since a query names whatever app a client likes.


@app.get("/limits", dependencies=[Depends(within_limit("friends_per_user", user="user", appkey=from_query))])
async def limits(request: Request, app: str, user: str) -> dict[str, Any]:
    """How many friends this user may still add, and which features the app's plan has."""
    q: quota.Quota = request.app.state.quota
    friends = await q.limit(app, "friends_per_user", user=user)
    plan = await q.plan(app)
    return {"friends": dataclasses.asdict(friends), "plan": plan.plan, "translation": plan.features["translation"]}


@app.post("/translate", dependencies=[Depends(requires_feature("translation", appkey=from_query))])
async def translate(app: str, text: str) -> dict[str, str]:
    return {"app": app, "translated": text[::-1]}


@app.websocket("/{org}/{app_name}/users/{username}/connection")
async def connection(websocket: WebSocket, org: str, app_name: str, username: str) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        return
