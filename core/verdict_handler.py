"""The external verdict handler: one function that interop logic registers in the interceptor.

Interop rules (e.g. IVPN's "this connection belongs in the tunnel") need a say over every connection,
including re-evaluations after a policy change, without a round trip to another process on the packet
path. So a plain function is registered here, once, at interceptor start (`--verdict-handler
module:function`), and the interceptor's `verdict.decide()` calls it for every connection it filters. This
module is the contract: it lives in core so the handler's own module never imports the interceptor.

The handler gets a `ConnectionView` and returns a `Verdict` (optionally `(verdict, reason)`), `AcceptFinal(reason)`
or None for "no opinion". It runs on the verdict path: it must be fast and must not block. What it may do:
raise the verdict above Accept (Block, Drop, RerouteToTunnel) — a verdict only goes up, so it cannot
lower one; RerouteToTunnel means "keep it in the VPN" and always wins over a split rule; it may ask for
RerouteToSplitTun, which is honoured only where a split is possible; `AcceptFinal` accepts the connection for
good with mark 1709 (never split, and no later firewall rule of other software, such as a kill switch, may
drop it: for the VPN's own connections). A handler that raises is logged and counted, and the connection
stays in the VPN.

What the engine may skip for a cheap handler, declared as attributes on the handler (defaults in brackets):
`needs_process` [True]: look the process up before every verdict (False: only where the engine would anyway,
e.g. before splitting a socket of a uid splittun runs as); `by_destination` [False]: without a process the
answer depends only on the destination, the direction and the VPN status, so the engine may cache verdicts
per destination as it does without a handler.

The handler is held as one reference replaced atomically as a whole, and it can be set once: a second
`set()` raises, so two registrations can never silently replace each other.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from messages import IvpnStatus, ProcessInfo, Verdict
from messages.flows import FiveTuple


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """What a handler may look at: the connection (its 5-tuple, direction), its process and name, the VPN
    status. `process` is None when it is not known; `attributed` says whether it was looked for (False: the
    verdict comes before the process, see `needs_process`; True and no process: none found, e.g. a kernel
    socket)."""

    flow: FiveTuple
    inbound: bool
    process: ProcessInfo | None
    domain: str
    ivpn: IvpnStatus | None
    attributed: bool = True

    @property
    def ip_version(self) -> int:
        return self.flow.ip_version


@dataclass(frozen=True, slots=True)
class AcceptFinal:
    """A handler's "accept for good, accept-final (1709)": the connection is the VPN's own."""

    reason: str = ""


HandlerResult = Verdict | tuple[Verdict, str] | AcceptFinal | None
VerdictHandler = Callable[[ConnectionView], HandlerResult]


class HandlerAlreadySet(RuntimeError):
    """A second registration: the first one stays; fix the caller that registers twice."""


class HandlerSlot:
    """Holds the one external handler. Reads are a plain attribute load (atomic in Python)."""

    def __init__(self) -> None:
        self._handler: VerdictHandler | None = None
        self._lock = threading.Lock()
        self.name = ""

    def set(self, handler: VerdictHandler, name: str = "") -> None:
        if not callable(handler):
            raise TypeError(f"verdict handler must be callable, got {type(handler).__name__}")
        with self._lock:
            if self._handler is not None:
                raise HandlerAlreadySet(f"an external verdict handler is already set ({self.name or 'unnamed'})")
            self.name = name or getattr(handler, "__qualname__", repr(handler))
            self._handler = handler

    def get(self) -> VerdictHandler | None:
        return self._handler


#: The interceptor process's one slot.
SLOT = HandlerSlot()


def set_external_verdict_handler(handler: VerdictHandler, name: str = "") -> None:
    """Register the handler for this interceptor process (once)."""
    SLOT.set(handler, name)


def load(spec: str, slot: HandlerSlot = SLOT) -> bool:
    """Import `module:function` and register the function. False when the module does not exist.

    The default spec points at the ivpn actor's interop module; until that module provides the function,
    the interceptor simply runs without a handler.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return False
        raise
    handler = getattr(module, attr or "interceptor_verdict_handler", None)
    if handler is None:
        return False
    slot.set(handler, spec)
    return True
