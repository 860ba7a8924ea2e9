"""Typed message schemas on msgpack.

A message is a frozen dataclass declared with `@message(topic)`; nested records use `@record`. On the
wire an event is the ZeroMQ multipart `[topic, payload]`, the payload a msgpack map holding the fields
plus `v`, the schema version. A bus message may carry several events of one topic (wire version 2,
`WIRE_VERSION`): `[topic, payload, payload, …]`, in the order they were published; `unbatch` splits it.
Decoding checks every field against the dataclass annotations and raises `MessageError` naming the message
and the field; fields a newer sender added are ignored (forward compatibility), a missing field without a
default is an error.

Why not pydantic or similar: the interceptor encodes one event per new connection on its verdict path, so
encoding is a plain dict build plus `msgpack.packb`, and the validators are compiled once per class.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeVar

import msgpack

VERSION_KEY = "v"

#: How events are framed on the bus (not a payload's schema version `v`). Version 1: one event per ZeroMQ
#: message, `[topic, payload]`. Version 2: one or more events of the same topic per message,
#: `[topic, payload, payload, …]` in publishing order — a process sends what it published in one loop turn
#: as one message per run of one topic, and the bus joins runs it forwards in one go (every subscriber pays
#: per message; bench/RESULTS.md, "events in batches"). One event is still `[topic, payload]`, the same
#: bytes as version 1; ZeroMQ's prefix subscriptions still filter on the topic frame.
WIRE_VERSION = 2
#: Most events in one bus message (a publisher's run or the bus's join stops there).
MAX_BATCH = 64

#: Upper bound for one payload; larger frames are refused before msgpack touches them.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


class MessageError(ValueError):
    """A message could not be decoded or does not match its schema. One line, names kind and field."""

    def __init__(self, kind: str, problem: str, field: str | None = None) -> None:
        self.kind = kind
        self.problem = problem
        self.field = field
        where = f"{kind}: field {field!r}: " if field else f"{kind}: "
        super().__init__(where + problem)


_Decoder = Callable[[Any, str, str], Any]  # (value, kind, path) -> decoded value
# One field: name, its decoder, required, the types a value may have to be taken as it is (no decoder call)
_Field = tuple[str, _Decoder, bool, tuple[type, ...]]


class Struct:
    """Base of every schema dataclass. Subclasses are made by `@record` or `@message`."""

    __slots__ = ()
    _decoders: ClassVar[tuple[_Field, ...] | None] = None
    _field_names: ClassVar[tuple[str, ...] | None] = None

    def to_wire(self) -> dict[str, Any]:
        """Field values as a dict; nested records are packed by `_pack_default`."""
        names = type(self)._field_names
        if names is None:
            names = type(self)._field_names = tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_wire(cls, data: Any, kind: str, path: str = "") -> Self:
        if not isinstance(data, dict):
            raise MessageError(kind, f"expected a map, got {_type_name(data)}", path or None)
        decoders = cls._decoders or _compile(cls)
        values: dict[str, Any] = {}
        for name, decode, required, exact in decoders:
            if name in data:
                value = data[name]
                # Most fields are plain str/int/float/bool already: a type test, not a call (every subscriber
                # decodes every event it gets; bench/RESULTS.md, "messages per connection").
                values[name] = (
                    value if type(value) in exact else decode(value, kind, f"{path}.{name}" if path else name)
                )
            elif required:
                raise MessageError(kind, "missing", f"{path}.{name}" if path else name)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:  # __post_init__ checks
            raise MessageError(kind, str(exc), path or None) from None


class Message(Struct):
    """A bus message: one topic, one schema, one version."""

    __slots__ = ()
    TOPIC: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    FAMILY: ClassVar[bool] = False  # TOPIC is a prefix; the instance names its full topic

    def wire_topic(self) -> str:
        return self.TOPIC

    def encode(self) -> list[bytes]:
        return [self.wire_topic().encode(), encode_payload(self)]


S = TypeVar("S", bound=type[Struct])

_schema_dataclass = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
_BY_TOPIC: dict[str, type[Message]] = {}
_FAMILIES: list[tuple[str, type[Message]]] = []


def record(cls: S) -> S:
    """Declare a nested record (a dataclass that travels inside messages)."""
    return _schema_dataclass(cls)  # type: ignore[return-value]


def message(topic: str, *, version: int = 1, family: bool = False) -> Callable[[S], S]:
    """Declare a bus message for `topic` (or for every topic under `topic` when family=True)."""

    def wrap(cls: S) -> S:
        made = _schema_dataclass(cls)
        made.TOPIC = topic
        made.VERSION = version
        made.FAMILY = family
        if family:
            _FAMILIES.append((topic, made))
            _FAMILIES.sort(key=lambda item: -len(item[0]))
        else:
            if topic in _BY_TOPIC:
                raise RuntimeError(f"two schemas for topic {topic}")
            _BY_TOPIC[topic] = made
        return made

    return wrap


def schema_for_topic(topic: str) -> type[Message] | None:
    found = _BY_TOPIC.get(topic)
    if found is not None:
        return found
    for prefix, cls in _FAMILIES:
        if topic.startswith(prefix):
            return cls
    return None


def known_topics() -> list[str]:
    return sorted([*_BY_TOPIC, *(p + "*" for p, _ in _FAMILIES)])


# --- encoding ---------------------------------------------------------------------------------------


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, Struct):
        return obj.to_wire()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


_packer_options = {"default": _pack_default, "use_bin_type": True}


def encode_payload(obj: Struct, version: int | None = None) -> bytes:
    data = obj.to_wire()
    data[VERSION_KEY] = version if version is not None else getattr(obj, "VERSION", 1)
    return msgpack.packb(data, **_packer_options)


# --- decoding ---------------------------------------------------------------------------------------


def unpack_payload(payload: bytes, kind: str) -> dict[str, Any]:
    """msgpack bytes → the map, with the version checked. Any failure is a MessageError."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MessageError(kind, f"payload must be bytes, got {_type_name(payload)}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(kind, f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise MessageError(kind, f"payload is not valid msgpack ({detail})") from None
    if not isinstance(data, dict):
        raise MessageError(kind, f"payload must be a map, got {_type_name(data)}")
    version = data.get(VERSION_KEY)
    if version is None:
        raise MessageError(kind, "missing (schema version)", VERSION_KEY)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MessageError(kind, f"schema version must be a positive int, got {version!r}", VERSION_KEY)
    return data


def decode_payload(cls: type[S], payload: bytes, kind: str | None = None) -> Any:
    """Decode one payload as `cls` (used for request/reply bodies, which have no topic)."""
    name = kind or getattr(cls, "TOPIC", "") or cls.__name__
    return cls.from_wire(unpack_payload(payload, name), name)


def unbatch(frames: list[Any]) -> list[list[Any]]:
    """The events of one bus message, each as `[topic, payload]` (a wire version 2 message carries several of
    one topic; a version 1 message is one). MessageError when there is no payload at all."""
    if len(frames) == 2:
        return [frames]
    if len(frames) < 2:
        raise MessageError("<message>", f"expected [topic, payload, ...], got {len(frames)} frame(s)")
    topic = frames[0]
    return [[topic, payload] for payload in frames[1:]]


def decode_all(frames: list[Any]) -> list[Message]:
    """Every event of one bus message, decoded (MessageError at the first bad one)."""
    return [decode(one) for one in unbatch(frames)]


def decode(frames: list[bytes]) -> Message:
    """Decode one event, `[topic, payload]`, into its typed schema, or raise MessageError. A bus message with
    several payloads (wire version 2) goes through `unbatch` or `decode_all` first."""
    if len(frames) != 2:
        raise MessageError("<message>", f"expected 2 frames [topic, payload], got {len(frames)} (unbatch a batch)")
    raw_topic, payload = frames
    try:
        topic = bytes(raw_topic).decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("<message>", f"topic is not UTF-8: {bytes(raw_topic)[:40]!r}") from None
    cls = schema_for_topic(topic)
    if cls is None:
        raise MessageError(topic, "unknown topic")
    data = unpack_payload(payload, topic)
    if cls.FAMILY:
        data = {**data, "topic": topic}
    return cls.from_wire(data, topic)


def decode_loose(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    """Topic and raw map of any well-formed event, known topic or not (for `splittun events`)."""
    if len(frames) != 2:
        raise MessageError("<message>", f"expected 2 frames [topic, payload], got {len(frames)}")
    topic = bytes(frames[0]).decode("utf-8", errors="replace")
    return topic, unpack_payload(frames[1], topic)


# --- validators compiled from annotations -----------------------------------------------------------


def _type_name(value: Any) -> str:
    return {dict: "map", list: "array", str: "str", bytes: "bin", type(None): "nil"}.get(
        type(value), type(value).__name__
    )


def _compile(cls: type[Struct]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, _decoder_for(hints[f.name]), required, _exact_types(hints[f.name])))
    cls._decoders = tuple(out)
    return cls._decoders


_PLAIN = (str, int, float, bool, bytes)


def _exact_types(tp: Any) -> tuple[type, ...]:
    """The types a value of annotation `tp` may have to be valid as it is: plain scalars (a bool is not an
    int here: `type(True) is bool`), and None for an optional one; () when it always needs its decoder."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return (*_exact_types(inner[0]), type(None)) if len(inner) == 1 and inner[0] in _PLAIN else ()
    return (tp,) if tp in _PLAIN else ()


def _decoder_for(tp: Any) -> _Decoder:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return lambda v, kind, path: v
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp}")
        sub = _decoder_for(inner[0])
        return lambda v, kind, path: None if v is None else sub(v, kind, path)
    if origin is list:
        item = _decoder_for(args[0]) if args else _decoder_for(Any)
        plain = args[0] if args and args[0] in _PLAIN else None

        def dec_list(v: Any, kind: str, path: str) -> list[Any]:
            if not isinstance(v, (list, tuple)):
                raise MessageError(kind, f"expected array, got {_type_name(v)}", path)
            if plain is not None and all(type(x) is plain for x in v):
                return list(v)  # a command line, a parent chain: no call per item
            return [item(x, kind, f"{path}[{i}]") for i, x in enumerate(v)]

        return dec_list
    if origin is dict:
        val = _decoder_for(args[1]) if args else _decoder_for(Any)

        def dec_map(v: Any, kind: str, path: str) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise MessageError(kind, f"expected map, got {_type_name(v)}", path)
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise MessageError(kind, f"map key must be str, got {_type_name(k)}", path)
                out[k] = val(x, kind, f"{path}.{k}")
            return out

        return dec_map
    if isinstance(tp, type) and issubclass(tp, Struct):
        return lambda v, kind, path: tp.from_wire(v, kind, path)
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        valid = ", ".join(str(m.value) for m in tp)

        def dec_enum(v: Any, kind: str, path: str) -> enum.IntEnum:
            if not isinstance(v, int) or isinstance(v, bool):
                raise MessageError(kind, f"expected int ({tp.__name__}), got {_type_name(v)}", path)
            try:
                return tp(v)
            except ValueError:
                raise MessageError(kind, f"{v} is not a valid {tp.__name__} ({valid})", path) from None

        return dec_enum
    if tp is bool:
        return _simple(lambda v: isinstance(v, bool), "bool")
    if tp is int:
        return _simple(lambda v: isinstance(v, int) and not isinstance(v, bool), "int")
    if tp is float:

        def dec_float(v: Any, kind: str, path: str) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise MessageError(kind, f"expected float, got {_type_name(v)}", path)
            return float(v)

        return dec_float
    if tp is str:
        return _simple(lambda v: isinstance(v, str), "str")
    if tp is bytes:
        return _simple(lambda v: isinstance(v, bytes), "bin")
    raise TypeError(f"unsupported schema annotation {tp!r}")


def _simple(check: Callable[[Any], bool], name: str) -> _Decoder:
    def dec(v: Any, kind: str, path: str) -> Any:
        if not check(v):
            raise MessageError(kind, f"expected {name}, got {_type_name(v)}", path)
        return v

    return dec
