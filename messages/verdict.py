"""Connection verdicts, numbered and named exactly as Portmaster's (see portmaster-facts.md).

A connection's verdict only ever goes up the order. `verdict_string` and `verdict_verb` mirror Go's
`Verdict.String()` and `Verdict.Verb()`, including their texts for values outside the enum, so events
and tables read the same to a Portmaster user.
"""

from __future__ import annotations

from enum import IntEnum

from .marks import VERDICT_MASK, Mark


class Verdict(IntEnum):
    UNDECIDED = 0
    UNDETERMINABLE = 1
    ACCEPT = 2
    BLOCK = 3
    DROP = 4
    REROUTE_TO_NAMESERVER = 5
    REROUTE_TO_TUNNEL = 6
    FAILED = 7
    REROUTE_TO_SPLIT_TUN = 8

    def string(self) -> str:
        return verdict_string(self)

    def verb(self) -> str:
        return verdict_verb(self)


class KextVerdict(IntEnum):
    """The Windows kernel driver's verdicts: its own numbering, with a permanent variant of accept, block and
    drop (the driver remembers those for the connection), and split tunnel = 11."""

    UNDECIDED = 0
    UNDETERMINABLE = 1
    ACCEPT = 2
    PERMANENT_ACCEPT = 3
    BLOCK = 4
    PERMANENT_BLOCK = 5
    DROP = 6
    PERMANENT_DROP = 7
    REROUTE_TO_NAMESERVER = 8
    REROUTE_TO_TUNNEL = 9
    FAILED = 10
    SPLIT_TUN = 11

    @property
    def permanent(self) -> bool:
        """The driver keeps it for every later packet of the connection (reroutes are permanent too)."""
        return self in _PERMANENT_KEXT


_PERMANENT_KEXT = {
    KextVerdict.PERMANENT_ACCEPT,
    KextVerdict.PERMANENT_BLOCK,
    KextVerdict.PERMANENT_DROP,
    KextVerdict.REROUTE_TO_NAMESERVER,
    KextVerdict.REROUTE_TO_TUNNEL,
    KextVerdict.SPLIT_TUN,
}

#: What the Windows kernel driver uses for "split tunnel" (it has its own numbering).
WINDOWS_KEXT_VERDICT_SPLIT_TUN = int(KextVerdict.SPLIT_TUN)

#: A verdict's packet mark (messages/marks.py, low 16 bits) → the driver verdict that does the same.
_KEXT_BY_MARK: dict[int, KextVerdict] = {
    0: KextVerdict.UNDECIDED,  # no verdict: the packet continues, the connection is not remembered
    Mark.ACCEPT: KextVerdict.ACCEPT,
    Mark.BLOCK: KextVerdict.BLOCK,
    Mark.DROP: KextVerdict.DROP,
    Mark.ACCEPT_FINAL: KextVerdict.PERMANENT_ACCEPT,
    Mark.ACCEPT_ALWAYS: KextVerdict.PERMANENT_ACCEPT,
    Mark.BLOCK_ALWAYS: KextVerdict.PERMANENT_BLOCK,
    Mark.DROP_ALWAYS: KextVerdict.PERMANENT_DROP,
    Mark.REROUTE_TO_TUNNEL: KextVerdict.REROUTE_TO_TUNNEL,
    Mark.REROUTE_TO_SPLIT_TUN: KextVerdict.SPLIT_TUN,
    Mark.REROUTE_TO_NAMESERVER: KextVerdict.REROUTE_TO_NAMESERVER,
}


def kext_verdict(mark: int) -> KextVerdict:
    """The driver verdict for a verdict's mark (the interface index above 16 bits is not the driver's)."""
    return _KEXT_BY_MARK.get(mark & VERDICT_MASK, KextVerdict.FAILED)


_STRINGS = {
    0: "<Undecided>",
    1: "<Undeterminable>",
    2: "Accept",
    3: "Block",
    4: "Drop",
    5: "RerouteToNameserver",
    6: "RerouteToTunnel",
    7: "Failed",
    8: "RerouteToSplitTun",
}
_VERBS = {
    0: "undecided",
    1: "undeterminable",
    2: "accepted",
    3: "blocked",
    4: "dropped",
    5: "redirected to nameserver",
    6: "tunneled",
    7: "failed",
    8: "split tunneled",
}
INVALID_STRING = "<INVALID VERDICT>"
INVALID_VERB = "invalid"


def verdict_string(value: int) -> str:
    """Go's Verdict.String(): the name, or `<INVALID VERDICT>` for a value outside 0–8."""
    return _STRINGS.get(int(value), INVALID_STRING)


def verdict_verb(value: int) -> str:
    """Go's Verdict.Verb(): the past-tense word used in UIs and logs, or `invalid`."""
    return _VERBS.get(int(value), INVALID_VERB)


def parse_verdict(text: str) -> Verdict:
    """Accept a number, a String() name or a verb (`split`, `accept`…) as a CLI filter would."""
    t = text.strip()
    if t.lstrip("-").isdigit():
        return Verdict(int(t))
    low = t.lower()
    for v in Verdict:
        names = {v.name.lower(), _STRINGS[v].strip("<>").lower(), _VERBS[v]}
        if low in names or _VERBS[v].startswith(low):
            return v
    raise ValueError(f"unknown verdict {text!r}")
