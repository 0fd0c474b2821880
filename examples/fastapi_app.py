"""A FastAPI IM gateway held to its plans by quota, in one call.

    pip install quota fastapi
    QUOTA_ADMIN_TOKEN=change-me-to-16-chars-or-more uvicorn examples.fastapi_app:app

Set QUOTA_REDIS_URL to share counters between processes; without it the store is in memory.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

import quota

app = FastAPI(title="IM gateway")
users: dict[str, set[str]] = {}
middleware = quota.install(app, config=os.environ.get("QUOTA_CONFIG"), redis_url=os.environ.get("QUOTA_REDIS_URL"))


@app.post("/{org}/{app_name}/users")
async def register(org: str, app_name: str, body: list[dict[str, Any]]) -> dict[str, Any]:
    for item in body:
        users.setdefault(str(item["username"]), set())
    return {"entities": [{"username": item["username"]} for item in body]}


@app.post("/{org}/{app_name}/users/{owner}/contacts/users/{friend}")
async def add_friend(org: str, app_name: str, owner: str, friend: str) -> dict[str, Any]:
    users.setdefault(owner, set()).add(friend)
    users.setdefault(friend, set()).add(owner)
    return {"entities": [{"username": friend}]}


@app.websocket("/{org}/{app_name}/users/{username}/connection")
async def connection(websocket: WebSocket, org: str, app_name: str, username: str) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        return
