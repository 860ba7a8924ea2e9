"""proxy_udp: transparent UDP proxy workers for split connections (the data path).

Sessions are keyed by client address AND original destination, so one client socket talking to several
peers (games, WebRTC, QUIC, DNS clients) keeps every peer apart — the bug Portmaster's proxy has.
"""
