"""Which notifications the config and the network call for now: pure functions of the config in force and
the latest netenv snapshot, so the controller only compares what holds now with what held before (a condition
that starts is shown, one that ends is retired; the split interface coming back is a notification of its own).
"""

from __future__ import annotations

from core import config as cfg
from core.egress import find_interface
from core.state.notifications import DONT_SHOW_AGAIN
from messages import NetenvChanged, Notification, NotificationAction

INTERFACE_GONE = "split-interface-gone"
INTERFACE_BACK = "split-interface-back"
CONFIG_REFUSED = "config-refused"
UPDATES_STALE = "updates-stale"
BACK_SHOWN_SECONDS = 600.0  # "it is back" is news for a while, not a standing condition

_RULES_SETTING = NotificationAction(id="open-rules", text="Edit rules", type="open-setting", payload={"key": cfg.RULES})
_INTERFACE_SETTING = NotificationAction(
    id="open-interface", text="Choose interface", type="open-setting", payload={"key": cfg.INTERFACE}
)


def unmatchable_rule_id(rule_id: str) -> str:
    return f"rule-never-matches-{rule_id}"


def conditions(config: cfg.Config, netenv: NetenvChanged | None, now: float) -> dict[str, Notification]:
    """The notifications whose condition holds now, by id (none before the first network snapshot, and none
    while split tunnelling is off: then nothing leaves through a split interface)."""
    if netenv is None or not config.enable:
        return {}
    found: dict[str, Notification] = {}
    if config.interface:
        missing = find_interface(netenv, config.interface) is None
        what = f"The split interface {config.interface!r}"
    else:
        missing = not (netenv.uplink_ipv4 or netenv.uplink_ipv6)
        what = "The physical uplink (the automatic split interface)"
    if missing:
        found[INTERFACE_GONE] = Notification(
            topic="notify.split.interface",
            id=INTERFACE_GONE,
            ts=now,
            title="Split interface gone",
            message=f"{what} is not there. Split connections stay in the VPN until it is back.",
            level="warning",
            actions=[_INTERFACE_SETTING],
        )
    for rule in config.rules:
        if rule.interface and find_interface(netenv, rule.interface) is None:
            note_id = unmatchable_rule_id(rule.id)
            found[note_id] = Notification(
                topic="notify.split.rule",
                id=note_id,
                ts=now,
                title="Split rule can never match",
                message=f"Rule {rule.id} sends connections through interface {rule.interface!r}, which does not "
                "exist. Its connections stay in the VPN.",
                level="warning",
                actions=[_RULES_SETTING, DONT_SHOW_AGAIN],
            )
    return found


def interface_back(config: cfg.Config, now: float) -> Notification:
    name = repr(config.interface) if config.interface else "the physical uplink"
    return Notification(
        topic="notify.split.interface",
        id=INTERFACE_BACK,
        ts=now,
        title="Split interface back",
        message=f"Split connections leave through {name} again.",
        level="info",
        expires=now + BACK_SHOWN_SECONDS,
        actions=[NotificationAction(id="ok", text="OK"), DONT_SHOW_AGAIN],
    )


def config_refused(error: str, now: float) -> Notification:
    return Notification(
        topic="notify.config.refused",
        id=CONFIG_REFUSED,
        ts=now,
        title="Config change refused",
        message=f"{error}. The previous config stays in force.",
        level="error",
        actions=[NotificationAction(id="ok", text="OK")],
    )


def updates_stale(name: str, version: str, age_days: float, max_age_days: int, now: float) -> Notification:
    """The preset index in force is older than `splittun/updateStaleAfterDays`: presets may miss a service's
    new domains and addresses."""
    return Notification(
        topic="notify.updates.stale",
        id=UPDATES_STALE,
        ts=now,
        title="Presets are out of date",
        message=f"The preset index in force ({name} {version}) was published {age_days:g} days ago (more than "
        f"{max_age_days}). Run `splittun update apply` or set splittun/updateSource.",
        level="warning",
        actions=[
            NotificationAction(
                id="open-updates", text="Update settings", type="open-setting", payload={"key": cfg.UPDATE_SOURCE}
            ),
            DONT_SHOW_AGAIN,
        ],
    )
