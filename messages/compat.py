"""The version 1 shapes of bus events that version 2 merged, for the views whose readers expect them: the
API's server-sent events (the web panel, scripts) and `splittun events`.

Version 2 sends fewer messages per connection (the bus and every subscriber pay per message): a decided
connection's `conn.new` carries its verdict, and a proxy session that closed before its open left carries the
open inside its `proxy.session.close`. A view splits them back into the two events a version 1 sender
published, in the order it published them, so what a browser or a script sees does not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from .events import ConnNew, ConnVerdict, ProxySessionClose, ProxySessionOpen
from .schema import VERSION_KEY
from .verdict import verdict_verb

_VERDICT_FIELDS = tuple(f.name for f in dataclasses.fields(ConnVerdict))  # type: ignore[arg-type]
_VERDICT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConnVerdict) if f.default is not dataclasses.MISSING}  # type: ignore[arg-type]
_VERDICT_ONLY = frozenset(_VERDICT_FIELDS) - {"conn_id", "ts"}
OPEN_FIELD = "opened"  # proxy.session.close (version 2): the session's open, when it never left on its own

# (topic that carries another, topic carried): a subscriber of the carried one must also hear the carrier
_MERGED = ((ConnNew.TOPIC, ConnVerdict.TOPIC), (ProxySessionClose.TOPIC, ProxySessionOpen.TOPIC))


def legacy_shapes(topic: str, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One decoded bus message (`schema.decode_loose`'s map) as the version 1 events it stands for, without
    the schema version key: a conn.new with its verdict → conn.new + conn.verdict; a proxy.session.close
    carrying its open → proxy.session.open + proxy.session.close; anything else as it is."""
    data = {k: v for k, v in data.items() if k != VERSION_KEY}
    if topic == ConnNew.TOPIC:
        new = {k: v for k, v in data.items() if k not in _VERDICT_ONLY}
        if data.get("verdict") is None:
            return [(topic, new)]
        verdict = {k: data.get(k, _VERDICT_DEFAULTS.get(k)) for k in _VERDICT_FIELDS}
        if not verdict["verb"] and isinstance(verdict["verdict"], int):
            verdict["verb"] = verdict_verb(verdict["verdict"])
        return [(topic, new), (ConnVerdict.TOPIC, verdict)]
    if topic == ProxySessionClose.TOPIC and OPEN_FIELD in data:
        opened = data.pop(OPEN_FIELD)
        if isinstance(opened, dict):
            return [(ProxySessionOpen.TOPIC, opened), (topic, data)]
    return [(topic, data)]


def legacy_subscriptions(prefixes: Sequence[str]) -> list[str]:
    """The bus subscriptions that deliver everything `prefixes` asks for in the version 1 shapes: asking for
    conn.verdict must also hear conn.new (where a new connection's verdict travels now), and so on. Filter
    what `legacy_shapes` returns with `wanted`."""
    out = list(prefixes)
    for carrier, carried in _MERGED:
        if wanted(carried, prefixes) and not wanted(carrier, out):
            out.append(carrier)
    return out


def wanted(topic: str, prefixes: Iterable[str]) -> bool:
    """Whether a topic is one the prefixes ask for ("" asks for everything)."""
    return any(topic.startswith(prefix) for prefix in prefixes)
