"""Two-process variants: the reference gateway in one process, a proxy in front of it.

proxy-off          `quota proxy` with quota's checks off: the cost of proxying alone (its own pool)
proxy-off-aiohttp  the same proxy with aiohttp as its client, to compare clients
proxy-off-httpx    the same proxy with httpx as its client
proxy-on         `quota proxy` with its checks, on Redis: the cost of quota as a proxy
nginx            nginx (Debian's package) with limit_req at the same rate: a rate-limiting proxy peer

Everything here runs pinned to the server core, as the single-process variants do, so a proxy and
its gateway share the CPU the bare gateway has alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.redis_server import free_port
from benchmarks.variants import limit_of

PROXY_VARIANTS = ("proxy-off", "proxy-off-aiohttp", "proxy-off-httpx", "proxy-on", "nginx")
NGINX_PACKAGES = ("nginx-light", "nginx")


def start_gateway(scenario: str, redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.server", "bare", scenario, str(port), redis_url]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(base + "/__bench/sent", timeout=1)
            return proc, base
        except httpx.HTTPError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the benchmark gateway did not start") from None
            time.sleep(0.05)


def nginx_binary() -> str | None:
    """nginx, installed from Debian's packages when missing and we may (root); None when it can't be."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found or None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for package in NGINX_PACKAGES:
        done = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, capture_output=True)
        if done.returncode == 0:
            break
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    limit_req_zone $binary_remote_addr zone=per_ip:10m rate={rate}r/s;
    limit_req_status 429;
    upstream gateway {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location = /__bench/sent {{ return 200 "0"; }}
        location / {{
            # nginx counts in milliseconds: without a burst, a second request in the same
            # millisecond is refused whatever the rate. A burst of one second's worth and nodelay
            # makes it a per-second budget, as quota's window is.
            limit_req zone=per_ip burst={rate} nodelay;
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def run_nginx(scenario: str, port: int, upstream_base: str) -> int:
    binary = nginx_binary()
    if binary is None:
        print("nginx is not installed and cannot be (apt-get install nginx-light as root)", file=sys.stderr)
        return 3
    workdir = Path(tempfile.mkdtemp(prefix="quota-bench-nginx-"))
    conf = workdir / "nginx.conf"
    upstream = upstream_base.rsplit(":", 1)[1]
    conf.write_text(NGINX_CONF.format(dir=workdir, rate=limit_of(scenario), upstream=upstream, port=port))
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)])

    def stop(*_: object) -> None:
        proc.send_signal(signal.SIGQUIT)

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
