"""Connection verdicts, numbered and named exactly as Portmaster's (see portmaster-facts.md).

A connection's verdict only ever goes up the order. `verdict_string` and `verdict_verb` mirror Go's
`Verdict.String()` and `Verdict.Verb()`, including their texts for values outside the enum, so events
and tables read the same to a Portmaster user.
"""

from __future__ import annotations

from enum import IntEnum


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


#: What the Windows kernel driver uses for "split tunnel" (it has its own numbering).
WINDOWS_KEXT_VERDICT_SPLIT_TUN = 11

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
