"""The split-tunnel policy, shared by the controller (builds and validates rules, compiles the
`policy.snapshot`) and the interceptor (evaluates it for every new connection).

- `rules`: rule construction and validation; Portmaster endpoint-list strings.
- `match`: `CompiledPolicy(snapshot).evaluate(ConnectionFacts) -> Decision`; first match wins, default keep.
"""

from .match import EMPTY_POLICY, AppFacts, CompiledPolicy, ConnectionFacts, Decision
from .rules import RuleError, describe, parse_endpoint, parse_ports, validate

__all__ = [
    "EMPTY_POLICY",
    "AppFacts",
    "CompiledPolicy",
    "ConnectionFacts",
    "Decision",
    "RuleError",
    "describe",
    "parse_endpoint",
    "parse_ports",
    "validate",
]
