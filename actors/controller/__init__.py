"""controller: config, policy compilation, the connection registry and the CLI's control endpoint.

It binds `controller.ctl.sock`; the CLI sends requests there. It keeps the last heartbeat of every
actor so `splittun status` can show how long ago each one spoke. Never on the packet path.
"""
