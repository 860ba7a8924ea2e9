"""The api actor: splittun's local HTTP API (127.0.0.1:817 and [::1]:817) for the web panel and scripts.

Not on any data path: it answers HTTP by sending the same control ops the CLI sends (messages/control.py) and
streams bus events as server-sent events. policy.py is the security policy (pure), http.py the routes,
actor.py the process (the aiohttp server runs on its own thread beside the runtime's loop). panel/ is the web
panel (static HTML, CSS and ES modules served at / after `splittun ui`'s login), panel.py how it is served.
"""
