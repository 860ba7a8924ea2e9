"""The api process: the aiohttp server on its own thread and asyncio loop; the runtime's loop beside it answers
the `login` op (`splittun ui`) and sends heartbeats.

It binds loopback only: 127.0.0.1 and [::1] on `--port` (817, Portmaster's; `splittun up --api-port N`). An
address that cannot be bound (IPv6 off) is logged and skipped; while neither is bound (another instance in this
network namespace holds the port) the actor is not ready, says why, and tries again every few seconds.
Tokens come from the run directory (core/access.py), made here if `up` did not make them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from typing import Any

from aiohttp import web

from core import access
from messages.control import Api as ApiOps
from messages.control import LoginCode, NoArgs
from runtime.actor import Actor, answers
from runtime.log import describe

from .http import HttpApi

DEFAULT_PORT = 817
BIND = ("127.0.0.1", "::1")
RETRY_BIND_SECONDS = 5.0


class ApiActor(Actor):
    """The local HTTP API."""

    name = "api"
    control = ApiOps

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        default = int(os.environ.get("SPLITTUN_API_PORT") or DEFAULT_PORT)
        parser.add_argument("--port", type=int, default=default, help=f"TCP port on loopback (default {default})")

    def start(self) -> None:
        self.port: int = self.rt.args.port
        self.api = HttpApi(self.rt.run_dir, access.load_or_generate(self.rt.run_dir), self.log, self.port)
        self.bound: list[str] = []
        self.failed = ""
        self.aloop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), name="api-http", daemon=True)
        self.thread.start()
        started.wait(10)
        self.retry = self.rt.loop.call_every(RETRY_BIND_SECONDS, self._retry_bind)

    def _retry_bind(self) -> None:
        if self.bound:
            self.retry.cancel()
            return
        asyncio.run_coroutine_threadsafe(self._bind(), self.aloop)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.aloop)
        try:
            self.aloop.run_until_complete(self._listen())
        finally:
            started.set()
        self.aloop.run_forever()

    async def _listen(self) -> None:
        self.runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        await self._bind()

    async def _bind(self) -> None:
        assert self.runner is not None
        for host in BIND:
            try:
                await web.TCPSite(self.runner, host, self.port, reuse_address=True).start()
            except OSError as exc:
                failed, self.failed = self.failed, describe(exc)
                if failed != self.failed:  # once, not at every retry
                    self.log.warning("api.bind_failed", address=f"[{host}]:{self.port}", error=self.failed)
                continue
            self.bound.append(f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}")
        if self.bound:
            self.log.info("api.listening", addresses=",".join(self.bound))

    @answers(ApiOps.LOGIN)
    def answer_login(self, args: NoArgs) -> LoginCode:
        url, expires = self.api.login_url()
        return LoginCode(url=url, expires=expires)

    def readiness(self) -> str:
        return "" if self.bound else f"not listening on port {self.port}: {self.failed}"

    def counters(self) -> dict[str, int]:
        return {
            "http_requests": self.api.requests,
            "http_refused": self.api.refused,
            "sse_clients": self.api.sse_clients,
        }

    def stop(self) -> None:
        async def close() -> Any:
            if self.runner is not None:
                await self.runner.cleanup()
            self.api.zctx.destroy(linger=0)

        if self.thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(close(), self.aloop)
            try:
                future.result(timeout=1.5)
            except Exception as exc:
                self.log.warning("api.stop_slow", error=describe(exc))
            self.aloop.call_soon_threadsafe(self.aloop.stop)
            self.thread.join(timeout=0.5)
