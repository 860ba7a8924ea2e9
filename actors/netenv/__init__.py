"""The netenv actor: watches netlink and publishes `netenv.changed` (the library is core/netenv)."""
