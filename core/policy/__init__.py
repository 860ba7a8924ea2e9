"""The split-tunnel policy, shared by the controller (builds and validates rules, compiles the
`policy.snapshot`) and the interceptor (matches it against every new connection).

- `rules`: rule construction and validation; Portmaster endpoint-list strings.
- `match`: `CompiledPolicy(snapshot).match(flow, domain, process) -> RuleMatch`; first match wins, default
  keep. `AppFacts.from_process` is how a `ProcessInfo` becomes what app rules look at.
"""

from .match import EMPTY_POLICY, AppFacts, CompiledPolicy, RuleMatch
from .rules import RuleError, describe, parse_endpoint, parse_ports, validate

__all__ = [
    "EMPTY_POLICY",
    "AppFacts",
    "CompiledPolicy",
    "RuleError",
    "RuleMatch",
    "describe",
    "parse_endpoint",
    "parse_ports",
    "validate",
]
