"""Installing, switching and rolling back preset versions on disk (core/updates/store.py), from a directory and
from an https server on loopback; every bad input is one line and leaves the data directory byte for byte as it
was."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.presets import parse_preset, presets_of
from core.updates.source import UpdateError, open_source
from core.updates.store import STAGING_PREFIX, RuleRefusal, Store
from tests.support.updates import https_server, make_cert, publish, snapshot

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
V1 = {"video": [{"dest": "203.0.113.80"}]}
V2 = {"video": [{"dest": "203.0.113.81"}], "game": [{"proto": "udp", "ports": "27015-27050"}]}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.fixture
def store(tmp_path: Path, home: Path) -> Store:
    builtin = publish(tmp_path / "builtin", "1.0.0", {"video": [{"dest": "203.0.113.99"}]}, NOW - 3 * DAY)
    return Store(home / "presets", builtin, parse_preset)


def install(store: Store, source: str, now: datetime = NOW) -> str:
    switched = store.install(store.stage(open_source(source), now), now)
    return f"{switched.kind} {switched.previous.index.version} -> {switched.current.index.version}"


def video_dest(store: Store) -> str:
    return presets_of(store.current()).get("video").entries[0].dest  # type: ignore[union-attr]


def test_install_switch_and_rollback(tmp_path: Path, home: Path, store: Store) -> None:
    assert store.current().label == "builtin" and store.previous() is None
    assert not (home / "presets").exists()  # nothing on disk until the first update
    v11 = publish(tmp_path / "v11", "1.1.0", V1, NOW - 2 * DAY)
    assert install(store, str(v11)) == "upgrade 1.0.0 -> 1.1.0"
    assert video_dest(store) == "203.0.113.80"
    v12 = publish(tmp_path / "v12", "1.2.0", V2, NOW - DAY)
    assert install(store, f"file://{v12}") == "upgrade 1.1.0 -> 1.2.0"
    assert video_dest(store) == "203.0.113.81" and "game" in presets_of(store.current())
    # Only the version in force and the one before it stay on disk; the built-in one is never copied.
    assert sorted(p.name.split("-")[0] for p in (home / "presets" / "versions").iterdir()) == ["1.1.0", "1.2.0"]
    assert not list(home.glob(f"{STAGING_PREFIX}*"))
    back = store.rollback()
    assert (back.kind, str(back.current.index.version), str(back.previous.index.version)) == (
        "rollback",
        "1.1.0",
        "1.2.0",
    )
    assert video_dest(store) == "203.0.113.80"
    assert str(store.rollback().current.index.version) == "1.2.0"  # a second rollback undoes the first


def test_rollback_with_nothing_installed(store: Store) -> None:
    with pytest.raises(UpdateError, match=r"^nothing to roll back to"):
        store.rollback()


def test_rollback_to_the_builtin_set(tmp_path: Path, store: Store) -> None:
    install(store, str(publish(tmp_path / "v11", "1.1.0", V1, NOW - 2 * DAY)))
    assert store.rollback().current.label == "builtin"
    assert video_dest(store) == "203.0.113.99"


def _corrupt_index(d: Path) -> None:
    (d / "index.json").write_text('{"name": "splittun-presets", "version": ')


def _wrong_hash(d: Path) -> None:
    (d / "video.json").write_text((d / "video.json").read_text().replace("203.0.113.81", "203.0.113.82"))


def _truncated(d: Path) -> None:
    data = (d / "video.json").read_bytes()
    (d / "video.json").write_bytes(data[: len(data) // 2])


def _bad_preset(d: Path) -> None:
    from core.updates.store import pack

    (d / "video.json").write_text('{"name": "video", "entries": [{"dest": "10.0.0.0/33", "source": "x"}]}')
    pack(d, "splittun-presets", "1.2.0", NOW - DAY)


BAD = {
    "corrupt index": (_corrupt_index, "index: not valid JSON"),
    "wrong hash": (_wrong_hash, "video.json does not match its sha256 in the index"),
    "truncated download": (_truncated, "video.json has 32 bytes, the index says 64 (cut short?)"),
    "invalid preset": (_bad_preset, "video.json.entries[0].dest: '10.0.0.0/33' is not a valid CIDR"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_download_is_refused_and_nothing_changes(tmp_path: Path, home: Path, store: Store, case: str) -> None:
    install(store, str(publish(tmp_path / "v11", "1.1.0", V1, NOW - 2 * DAY)))
    before = snapshot(home)
    v12 = publish(tmp_path / "v12", "1.2.0", {"video": [{"dest": "203.0.113.81"}]}, NOW - DAY)
    spoil, message = BAD[case]
    spoil(v12)
    if case == "truncated download":
        message = message.replace("32", str((v12 / "video.json").stat().st_size)).replace("64", "")
    with pytest.raises(UpdateError) as caught:
        install(store, str(v12))
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"source {v12}: ")
    assert message.split(" the index says")[0] in line, line
    assert snapshot(home) == before
    assert video_dest(store) == "203.0.113.80"


@pytest.mark.parametrize(
    ("case", "source", "message"),
    [
        ("another name", "other", "refused by rule name: the new index is 'other-presets'"),
        ("the same index", "same", "refused by rule same-date:"),
        ("unreachable directory", "/nonexistent/presets", "source /nonexistent/presets: no index.json there"),
        ("unreachable https", "https://127.0.0.1:9/presets", "source https://127.0.0.1:9/presets: unreachable ("),
        ("plain http", "http://127.0.0.1:9/", "source http://127.0.0.1:9/: expected an absolute directory path"),
        ("no source", "", "no update source configured: set splittun/updateSource"),
    ],
)
def test_refusals_are_one_line_and_change_nothing(
    tmp_path: Path, home: Path, store: Store, case: str, source: str, message: str
) -> None:
    v11 = publish(tmp_path / "v11", "1.1.0", V1, NOW - 2 * DAY)
    install(store, str(v11))
    before = snapshot(home)
    if source == "other":
        source = str(publish(tmp_path / "other", "1.2.0", V1, NOW - DAY, name="other-presets"))
    elif source == "same":
        source = str(v11)
    with pytest.raises(UpdateError) as caught:
        install(store, source)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert isinstance(caught.value, RuleRefusal) == message.startswith("refused by rule")
    assert snapshot(home) == before


def test_install_checks_the_rules_again_against_the_version_in_force_then(tmp_path: Path, store: Store) -> None:
    """Staged against 1.0.0, but 1.2.0 went in meanwhile: installing the staged 1.1.0 is a downgrade to a version
    published earlier... which is fine by the rules, unless 1.2.0 was published less than 20 min ago."""
    v11 = publish(tmp_path / "v11", "1.1.0", V1, NOW - 2 * DAY)
    staged = store.stage(open_source(str(v11)), NOW)
    install(store, str(publish(tmp_path / "v12", "1.2.0", V2, NOW - timedelta(minutes=5))))
    with pytest.raises(RuleRefusal, match=r"^refused by rule stale-cdn: "):
        store.install(staged, NOW)
    assert not staged.exists()


def test_a_tampered_version_on_disk_is_not_loaded(tmp_path: Path, home: Path, store: Store) -> None:
    install(store, str(publish(tmp_path / "v11", "1.1.0", V1, NOW - 2 * DAY)))
    (version,) = (home / "presets" / "versions").iterdir()
    (version / "video.json").write_text("{}")
    with pytest.raises(UpdateError, match=r"^version 1\.1\.0-\w+: video.json has 2 bytes, the index says"):
        store.current()


# --- https ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def served(tmp_path: Path, cert: tuple[Path, Path]) -> Iterator[tuple[Path, str]]:
    v12 = publish(tmp_path / "v12", "1.2.0", V2, NOW - DAY)
    with https_server(v12, *cert) as url:
        yield v12, url


def test_https_source_with_the_test_ca(store: Store, served: tuple[Path, str], cert: tuple[Path, Path]) -> None:
    _, url = served
    switched = store.install(store.stage(open_source(url, cafile=str(cert[0])), NOW), NOW)
    assert str(switched.current.index.version) == "1.2.0" and video_dest(store) == "203.0.113.81"


def test_https_source_without_the_ca_is_refused(home: Path, store: Store, served: tuple[Path, str]) -> None:
    _, url = served
    before = snapshot(home)
    with pytest.raises(UpdateError, match=r"unreachable \(certificate verify failed: self-signed certificate\)$"):
        store.stage(open_source(url), NOW)
    assert snapshot(home) == before


def test_https_download_cut_short(tmp_path: Path, home: Path, store: Store, cert: tuple[Path, Path]) -> None:
    v12 = publish(tmp_path / "v12", "1.2.0", V2, NOW - DAY)
    before = snapshot(home)
    with https_server(v12, *cert, cut="video.json") as url, pytest.raises(UpdateError) as caught:
        store.stage(open_source(url, cafile=str(cert[0])), NOW)
    assert str(caught.value) == f"source {url}: video.json: download cut short (IncompleteRead)"
    assert snapshot(home) == before


def test_a_redirect_off_https_is_refused(tmp_path: Path, home: Path, store: Store, cert: tuple[Path, Path]) -> None:
    v12 = publish(tmp_path / "v12", "1.2.0", V2, NOW - DAY)
    before = snapshot(home)
    with (
        https_server(v12, *cert, redirect="http://127.0.0.1:9/index.json") as url,
        pytest.raises(UpdateError) as caught,
    ):
        store.stage(open_source(url, cafile=str(cert[0])), NOW)
    assert str(caught.value) == (
        f"source {url}: unreachable (redirected to http://127.0.0.1:9/index.json, which is not https)"
    )
    assert snapshot(home) == before
