"""DNS as splittun uses it: what answers teach (answers.py), the address → name table the resolver and the
interceptor share (names.py), where a query goes (route.py) and the resolver's answer cache (cache.py).

Pure logic over bytes and plain objects, except the name table (a memory-mapped file); the resolver actor
(actors/resolver) and the interceptor (actors/interceptor) do the I/O around it.
"""
