"""The typed control plane: ops declared once (messages/control.py), answered through each actor's registry
(runtime/actor.py), asked with `transport.ask`, and the CLI sending config edits to the controller."""

from __future__ import annotations

import inspect
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import zmq

from actors.api.actor import ApiActor
from actors.controller.actor import ControllerActor
from actors.interceptor.actor import InterceptorActor
from actors.ivpn.actor import IvpnActor
from actors.netenv.actor import NetenvActor
from actors.proxy_tcp.actor import ProxyTcpActor
from actors.proxy_udp.actor import ProxyUdpActor
from actors.resolver.actor import ResolverActor
from messages import PolicyRule
from messages import control as c
from messages.control import Controller, Edited, NoArgs, Ping, Proxy, ProxyStatus, Request, RequestFailed
from runtime import log as logmod
from runtime import paths
from runtime.actor import Actor, answers, dispatch
from runtime.paths import Home
from runtime.transport import ReplyServer, ask, request
from splittun import cli
from tests.support import REPO

REAL_ACTORS: tuple[type[Actor], ...] = (
    ApiActor,
    ControllerActor,
    InterceptorActor,
    NetenvActor,
    ProxyTcpActor,
    ProxyUdpActor,
    IvpnActor,
    ResolverActor,
)

STATUS = ProxyStatus(protocol="tcp", listen=[["127.0.0.17", 719]], egress={"ipv4": "eth0"}, counters={"sessions": 3})


class FakeProxy(Actor):
    """A proxy as far as the control plane goes: its handlers are test doubles."""

    name = "fake"
    control = Proxy

    @answers(Proxy.STATUS)
    def status(self, args: NoArgs) -> ProxyStatus:
        return STATUS

    @answers(Proxy.EGRESS)
    def egress(self, args: c.Upstream) -> list[dict[str, Any]]:
        if args.port == 666:
            raise ZeroDivisionError("the handler broke")
        if args.port == 667:
            raise RequestFailed(c.NOT_FOUND, "nothing goes there")
        return [{"ip": args.ip, "port": args.port}]

    @answers(Proxy.SESSIONS)
    def sessions(self, args: c.SessionsArgs) -> list[dict[str, Any]]:
        return {"not": "a list"}  # type: ignore[return-value]  # a handler bug: answered as internal


def fake_runtime() -> Any:
    rt = SimpleNamespace(name="fake", instance="fake_00", pid=4242, log=logmod.EventLog("fake_00"))
    rt.uptime = lambda: 1.5
    rt.all_counters = lambda actor: {"requests": 7}
    return rt


@pytest.fixture
def actor() -> FakeProxy:
    return FakeProxy(fake_runtime())


def failure(actor: Actor, op: str, args: dict[str, Any] | None = None) -> RequestFailed:
    with pytest.raises(RequestFailed) as caught:
        dispatch(actor, Request(op=op, args=args or {}))
    return caught.value


# --- declarations -----------------------------------------------------------------------------------


def test_every_op_is_declared_once_with_a_record_and_a_one_line_doc() -> None:
    seen: set[tuple[str, str]] = set()
    for op in c.all_ops():
        assert op.actor and (op.actor, op.name) not in seen, op
        seen.add((op.actor, op.name))
        assert issubclass(op.args, c.Struct) and op.doc and "\n" not in op.doc, op
        assert op.doc[0].isupper() and op.doc.endswith("."), op
    assert {g.actor for g in c.groups()} == {
        "*",
        "api",
        "controller",
        "interceptor",
        "ivpn",
        "netenv",
        "proxy",
        "resolver",
    }
    assert {op.name for op in Controller.ops} >= {"enable", "disable", "interface.set", "rules.add", "config.set"}


def test_every_declared_op_has_a_handler_in_exactly_one_actor() -> None:
    bound: dict[c.Op[Any, Any], set[Any]] = {}
    for cls in (Actor, *REAL_ACTORS):
        groups = [c.AnyActor] + ([cls.control] if cls.control else [])
        assert set(cls.handlers) == {op.name for g in groups for op in g.ops}, cls  # all of its groups' ops
        for op, method in cls.handlers.values():
            bound.setdefault(op, set()).add(inspect.unwrap(getattr(cls, method)))
    for op in c.all_ops():
        assert len(bound.get(op, ())) == 1, f"{op!r} is answered by {bound.get(op)}"
    groups = {c.Api, c.Controller, c.Interceptor, c.Ivpn, c.Netenv, c.Proxy, c.Resolver}
    assert {cls.control for cls in REAL_ACTORS if cls.control} == groups


def test_a_handler_can_only_bind_its_own_actors_ops() -> None:
    with pytest.raises(TypeError, match="answers <op controller:policy>, but Stray answers Proxy"):

        class Stray(Actor):
            control = Proxy

            @answers(Controller.POLICY)
            def policy(self, args: NoArgs) -> Any: ...

    with pytest.raises(TypeError, match="binds op 'status' twice"):

        class Twice(Actor):
            control = Proxy

            @answers(Proxy.STATUS)
            def one(self, args: NoArgs) -> Any: ...

            @answers(Proxy.STATUS)
            def two(self, args: NoArgs) -> Any: ...


def test_the_doc_lists_every_op_under_its_actor() -> None:
    doc = (REPO / "docs" / "control-plane.md").read_text()
    for group in c.groups():
        heading = re.search(rf"^### `{re.escape(group.__name__)}`.*?$(.*?)(?=^##|\Z)", doc, re.M | re.S)
        assert heading, f"docs/control-plane.md has no section for {group.__name__}"
        for op in group.ops:
            assert f"`{op.name}`" in heading.group(1), f"{op!r} is missing from docs/control-plane.md"


# --- dispatch ----------------------------------------------------------------------------------------


def test_unknown_op(actor: FakeProxy) -> None:
    err = failure(actor, "launch-rockets")
    assert (err.code, err.message) == (c.UNKNOWN_OP, "fake has no op 'launch-rockets'")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"ip": "192.0.2.1", "port": "80"}, "egress: field 'port': expected int, got str"),
        ({"port": 80}, "egress: field 'ip': missing"),
        ({"ip": ["x"], "port": 80}, "egress: field 'ip': expected str, got array"),
    ],
)
def test_bad_arguments_are_invalid_argument_naming_the_field(
    actor: FakeProxy, args: dict[str, Any], message: str
) -> None:
    err = failure(actor, "egress", args)
    assert (err.code, err.message) == (c.INVALID_ARGUMENT, message)


def test_arguments_are_decoded_and_extra_fields_ignored(actor: FakeProxy) -> None:
    got = dispatch(actor, Request(op="egress", args={"ip": "192.0.2.1", "port": 80, "newer": True}))
    assert got == [{"ip": "192.0.2.1", "port": 80}]


def test_the_runtime_answers_ping_and_counters_through_the_registry(actor: FakeProxy) -> None:
    assert dispatch(actor, Request(op="ping")) == {"name": "fake", "instance": "fake_00", "pid": 4242, "uptime": 1.5}
    assert dispatch(actor, Request(op="counters")) == {"requests": 7}


@pytest.fixture
def served(actor: FakeProxy, tmp_path: Path) -> Iterator[str]:
    """The fake actor behind a real reply server, polled by a thread."""
    endpoint = f"ipc://{tmp_path}/fake.ctl.sock"
    with serving(endpoint, lambda req: dispatch(actor, req)):
        yield endpoint


class serving:
    """A ReplyServer answering with `handler` on a thread of its own while the block runs."""

    def __init__(self, endpoint: str, handler: Callable[[Request], Any]) -> None:
        self.endpoint, self.handler = endpoint, handler
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        ctx = zmq.Context()
        server = ReplyServer(ctx, self.endpoint, self.handler, logmod.EventLog("fake"))
        self.ready.set()
        try:
            while not self.stop.is_set():
                if server.sock.poll(20):
                    server.handle_ready()
        finally:
            server.close()
            ctx.term()

    def __enter__(self) -> serving:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_typed_result_round_trip(served: str) -> None:
    assert ask(served, Proxy.STATUS) == STATUS  # a record comes back as the record
    assert ask(served, c.AnyActor.PING) == Ping(name="fake", instance="fake_00", pid=4242, uptime=1.5)
    assert ask(served, Proxy.EGRESS, c.Upstream(ip="192.0.2.1", port=80)) == [{"ip": "192.0.2.1", "port": 80}]
    # What a third-party script sees: the same maps as ever.
    assert request(served, "status", {}) == STATUS.to_wire()
    with pytest.raises(TypeError, match="takes Upstream, got SessionsArgs"):
        ask(served, Proxy.EGRESS, c.SessionsArgs())


def test_errors_over_the_wire(served: str) -> None:
    with pytest.raises(RequestFailed) as caught:
        ask(served, Proxy.EGRESS, c.Upstream(ip="192.0.2.1", port=666))
    assert caught.value.code == c.INTERNAL and "ZeroDivisionError: the handler broke" in caught.value.message
    with pytest.raises(RequestFailed) as caught:
        ask(served, Proxy.EGRESS, c.Upstream(ip="192.0.2.1", port=667))
    assert (caught.value.code, caught.value.message) == (c.NOT_FOUND, "nothing goes there")
    with pytest.raises(RequestFailed) as caught:
        ask(served, Proxy.SESSIONS)  # the handler returned something else than it declares
    assert caught.value.code == c.INTERNAL and "sessions handler returned dict, not a list" in caught.value.message
    with pytest.raises(RequestFailed) as caught:
        request(served, "egress", {"ip": "192.0.2.1"})
    assert (caught.value.code, caught.value.message) == (c.INVALID_ARGUMENT, "egress: field 'port': missing")
    assert ask(served, Proxy.STATUS) == STATUS  # still serving


def test_a_reply_that_does_not_fit_the_declaration_is_refused_by_ask(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/odd.ctl.sock"
    with serving(endpoint, lambda req: {"protocol": "tcp"}), pytest.raises(RequestFailed) as caught:
        ask(endpoint, Proxy.STATUS, who="odd")
    assert caught.value.code == c.BAD_REQUEST
    assert caught.value.message == "odd sent a malformed reply: status result: field 'listen': missing"


def test_a_raw_client_needs_nothing_but_msgpack(served: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(served)
        sock.send(msgpack.packb({"op": "status", "args": {}, "v": 1}))
        assert sock.poll(3000)
        reply = msgpack.unpackb(sock.recv())
    finally:
        sock.close()
        ctx.term()
    assert reply["ok"] is True and reply["result"]["counters"] == {"sessions": 3}


# --- the CLI sends config edits to the controller ------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="config edits need root (the CLI refuses otherwise)")


class FakeController:
    """Records every request; answers edits as a controller that accepted them (version 42), or with the
    error `refuse` is set to."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.refuse: RequestFailed | None = None

    def __call__(self, req: Request) -> Any:
        self.requests.append(req)
        if self.refuse is not None:
            raise self.refuse
        rule = None
        if Controller.get(req.op) is Controller.ADD_RULE:
            rule = PolicyRule(id="r7", action="split", app_name=req.args["name"])
        return Edited(applied=True, version=42, rule=rule).to_wire()

    def last(self) -> tuple[str, dict[str, Any]]:
        req = self.requests[-1]
        return req.op, req.args


@pytest.fixture
def instance(home: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    monkeypatch.setenv("SPLITTUN_HOME", str(home))
    monkeypatch.delenv("SPLITTUN_RUN_DIR", raising=False)
    h = Home.from_env()
    h.prepare()
    return h


@pytest.fixture
def controller(instance: Home) -> Iterator[FakeController]:
    fake = FakeController()
    with serving(paths.control(instance.run_dir), fake):
        yield fake


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


@needs_root
@pytest.mark.parametrize(
    ("argv", "op", "args", "said"),
    [
        (["enable"], "enable", {}, "split tunnelling enabled"),
        (["disable"], "disable", {}, "split tunnelling disabled"),
        (["interface", "eth0"], "interface.set", {"choice": "eth0"}, "interface set to eth0"),
        (["rules", "remove", "r1"], "rules.remove", {"id": "r1"}, "removed r1"),
        (["rules", "move", "r2", "1"], "rules.move", {"id": "r2", "position": 1}, "moved r2 to position 1"),
        (
            ["config", "set", "splittun/enable", "true"],
            "config.set",
            {"key": "splittun/enable", "value": "true"},
            "splittun/enable set",
        ),
    ],
)
def test_cli_edits_are_ops_sent_to_the_controller(
    controller: FakeController,
    instance: Home,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    op: str,
    args: dict[str, Any],
    said: str,
) -> None:
    assert run_cli(capsys, *argv) == (0, f"{said}: applied (policy version 42)", "")
    assert controller.last() == (op, args)
    assert not instance.config_file.exists()  # the controller writes the file, never the CLI


@needs_root
def test_cli_rule_add_sends_every_flag_and_shows_the_rule_the_controller_made(
    controller: FakeController, instance: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "rules", "add", "--name", "curl", "--port", "80-90", "--interface", "wlan7")
    assert code == 0 and re.fullmatch(r"added r7: .*curl.*: applied \(policy version 42\)", out), out
    op, args = controller.last()
    assert op == "rules.add"
    assert c.RuleAdd.from_wire(args, op) == c.RuleAdd(name="curl", port="80-90", interface="wlan7")
    assert not instance.config_file.exists()


@needs_root
@pytest.mark.parametrize(
    ("refusal", "exit_code", "line"),
    [
        (
            RequestFailed(c.INVALID_ARGUMENT, "--interface: unknown interface 'nosuch0'"),
            2,
            "splittun: --interface: unknown interface 'nosuch0'",
        ),
        (RequestFailed(c.NOT_FOUND, "r9: no such rule (rules: r1)"), 2, "splittun: r9: no such rule (rules: r1)"),
        (RequestFailed(c.INTERNAL, "rules.add failed: OSError: disk full"), 1, None),
    ],
)
def test_cli_prints_the_controllers_refusal_in_one_line(
    controller: FakeController,
    capsys: pytest.CaptureFixture[str],
    refusal: RequestFailed,
    exit_code: int,
    line: str | None,
) -> None:
    controller.refuse = refusal
    code, out, err = run_cli(capsys, "rules", "add", "--interface", "nosuch0")
    assert (code, out) == (exit_code, "") and len(err.splitlines()) == 1
    assert err == line if line else err.startswith("splittun: the controller could not make the change: rules.add")


@needs_root
def test_without_a_controller_the_cli_edits_the_file_with_the_same_validation(
    instance: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "rules", "add", "--name", "curl")
    assert code == 0 and out.endswith("saved; splittun is not running, it applies at 'splittun up'"), out
    assert out.startswith("added r1: ")
    assert run_cli(capsys, "rules", "add", "--interface", "nosuch0") == (
        2,
        "",
        "splittun: --interface: unknown interface 'nosuch0'",
    )
    assert run_cli(capsys, "rules", "remove", "r5")[2] == "splittun: r5: no such rule (rules: r1)"
    code, out, _ = run_cli(capsys, "rules", "list", "--json")
    assert code == 0 and [r["id"] for r in __import__("json").loads(out)] == ["r1"]


@needs_root
def test_a_leftover_controller_socket_does_not_block_edits(
    instance: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from splittun.commands import configure

    monkeypatch.setattr(configure, "EDIT_TIMEOUT", 0.3)
    sock = paths.endpoint_file(paths.control(instance.run_dir))
    assert sock is not None
    sock.touch()  # a controller that died with its supervisord, leaving its socket file
    started = time.monotonic()
    code, out, _ = run_cli(capsys, "enable")
    assert code == 0 and out.endswith("saved; splittun is not running, it applies at 'splittun up'")
    assert time.monotonic() - started < 5
    assert '"splittun/enable": true' in instance.config_file.read_text()
