"""The split-tunnel policy, shared by the controller (builds and validates rules, compiles the
`policy.snapshot`) and the interceptor (matches it against every new connection).

- `rules`: rule construction and validation; Portmaster endpoint-list strings.
- `match`: `CompiledPolicy(snapshot).match(flow, domain, process) -> RuleMatch`; first match wins, default
  keep. `AppFacts.from_process` is how a `ProcessInfo` becomes what app rules look at.
"""

from .match import EMPTY_POLICY, AppFacts, CompiledPolicy, RuleMatch
from .rules import PRESET_NAME, RuleError, describe, parse_endpoint, parse_ports, proto_ports, validate

__all__ = [
    "EMPTY_POLICY",
    "PRESET_NAME",
    "AppFacts",
    "CompiledPolicy",
    "RuleError",
    "RuleMatch",
    "describe",
    "parse_endpoint",
    "parse_ports",
    "proto_ports",
    "validate",
]
