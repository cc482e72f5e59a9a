from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from node import cli
from node.config import ConfigError, Peer, Settings, load_settings

REQUIRED = {"region": "eu", "data_dir": "data/eu"}


@pytest.fixture(autouse=True)
def _no_replica_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ; a REPLICA_* variable of the developer's must not leak in."""
    for name in list(os.environ):
        if name.startswith("REPLICA_"):
            monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "replica.toml"
    path.write_text(text)
    return path


def _load(
    flags: Mapping[str, object] = REQUIRED,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    return load_settings(flags, environ=environ or {}, config_file=config_file)


def test_defaults_fill_everything_but_region_and_data_dir() -> None:
    settings = _load()
    assert settings == Settings(region="eu", data_dir=Path("data/eu"))
    assert (settings.listen_host, settings.listen_port, settings.peers) == ("127.0.0.1", 8001, ())
    assert settings.lmdb_metasync is True


@pytest.mark.parametrize(
    ("field", "flag", "env", "toml_line", "expected"),
    [
        (
            "body_bytes_max",
            ("body_bytes_max", "30"),
            ("REPLICA_BODY_BYTES_MAX", "20"),
            "body_bytes_max = 10",
            [30, 20, 10, 1_048_576],
        ),
        (
            "listen_port",
            ("listen", "127.0.0.1:8003"),
            ("REPLICA_LISTEN", "127.0.0.1:8002"),
            'listen = "127.0.0.1:8001"',
            [8003, 8002, 8001, 8001],
        ),
        (
            "lmdb_metasync",
            ("lmdb_metasync", False),
            ("REPLICA_LMDB_METASYNC", "1"),
            "lmdb_metasync = false",
            [False, True, False, True],
        ),
        (
            "previous_format",
            ("previous_format", True),
            ("REPLICA_PREVIOUS_FORMAT", "false"),
            "previous_format = true",
            [True, False, True, False],
        ),
        (
            "log_level",
            ("log_level", "debug"),
            ("REPLICA_LOG_LEVEL", "WARNING"),
            'log_level = "error"',
            ["debug", "warning", "error", "info"],
        ),
        (
            "event_loop",
            ("event_loop", "asyncio"),
            ("REPLICA_EVENT_LOOP", "UVLOOP"),
            'event_loop = "asyncio"',
            ["asyncio", "uvloop", "asyncio", "uvloop"],
        ),
        (
            "peer_compression",
            ("peer_compression", "on"),
            ("REPLICA_PEER_COMPRESSION", "off"),
            'peer_compression = "on"',
            ["on", "off", "on", "auto"],
        ),
    ],
)
def test_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path,
    field: str,
    flag: tuple[str, object],
    env: tuple[str, str],
    toml_line: str,
    expected: list[object],
) -> None:
    config = _toml(tmp_path, toml_line)
    levels: list[tuple[Mapping[str, object], dict[str, str], Path | None]] = [
        ({**REQUIRED, flag[0]: flag[1]}, dict([env]), config),
        (REQUIRED, dict([env]), config),
        (REQUIRED, {}, config),
        (REQUIRED, {}, None),
    ]
    got = [getattr(_load(f, e, c), field) for f, e, c in levels]
    assert got == expected


def test_region_from_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'region = "sa-east-1"')
    env = {"REPLICA_REGION": "us"}
    assert _load({"region": "ap", "data_dir": "d"}, env, config).region == "ap"
    assert _load({"data_dir": "d"}, env, config).region == "us"
    assert _load({"data_dir": "d"}, {}, config).region == "sa-east-1"


def test_region_and_data_dir_can_come_from_environment_or_file(tmp_path: Path) -> None:
    from_env = _load({}, {"REPLICA_REGION": "us", "REPLICA_DATA_DIR": "/srv/us"})
    assert (from_env.region, from_env.data_dir) == ("us", Path("/srv/us"))
    config = _toml(tmp_path, 'region = "ap"\ndata_dir = "/srv/ap"\nlisten_port = 9001\n')
    from_file = _load({}, {}, config)
    assert (from_file.region, from_file.data_dir, from_file.listen_port) == (
        "ap",
        Path("/srv/ap"),
        9001,
    )


# Peers are only accepted with a cluster secret to authenticate them.
WITH_SECRET = {**REQUIRED, "cluster_secret": "s3cret"}


def test_peers_from_flags_with_trailing_slash_dropped() -> None:
    settings = _load(
        {**WITH_SECRET, "peer": ["us=http://127.0.0.1:8002/", "ap=https://ap.example.com:443"]}
    )
    assert settings.peers == (
        Peer("us", "http://127.0.0.1:8002"),
        Peer("ap", "https://ap.example.com:443"),
    )


def test_peers_from_environment_are_comma_separated() -> None:
    env = {"REPLICA_PEERS": "us=http://127.0.0.1:8002, ap=http://[::1]:8003"}
    settings = _load(WITH_SECRET, env)
    assert settings.peers == (Peer("us", "http://127.0.0.1:8002"), Peer("ap", "http://[::1]:8003"))


def test_peers_from_a_file_table(tmp_path: Path) -> None:
    config = _toml(tmp_path, '[peers]\nus = "http://10.0.0.2:8001"\nap = "http://10.0.0.3:8001"\n')
    assert _load(WITH_SECRET, {}, config).peers == (
        Peer("us", "http://10.0.0.2:8001"),
        Peer("ap", "http://10.0.0.3:8001"),
    )


def test_peers_from_a_higher_source_replace_the_whole_list(tmp_path: Path) -> None:
    config = _toml(tmp_path, '[peers]\nus = "http://10.0.0.2:8001"\n')
    env = {"REPLICA_PEERS": "ap=http://10.0.0.3:8001"}
    assert _load(WITH_SECRET, env, config).peers == (Peer("ap", "http://10.0.0.3:8001"),)


def test_peers_without_a_cluster_secret_are_refused() -> None:
    with pytest.raises(ConfigError, match="peers need a cluster secret"):
        _load({**REQUIRED, "peer": ["us=http://127.0.0.1:8002"]})


def test_tls_files_must_exist_and_cert_goes_with_key(tmp_path: Path) -> None:
    cert = tmp_path / "node.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        _load({**REQUIRED, "tls_cert": str(cert)})
    with pytest.raises(ConfigError, match="tls_ca must be a readable file"):
        _load({**REQUIRED, "tls_ca": str(tmp_path / "missing.pem")})


@pytest.mark.parametrize(
    ("flags", "env", "toml", "expected"),
    [
        ({"data_dir": "d"}, {}, None, ["missing region", "--region", "REPLICA_REGION"]),
        ({"region": "eu"}, {}, None, ["missing data_dir", "--data", "REPLICA_DATA_DIR"]),
        (REQUIRED, {}, "bodybytes = 1", ["unknown setting", "bodybytes", "replica.toml"]),
        (REQUIRED, {}, "region = [", ["replica.toml", "not valid TOML"]),
        (
            REQUIRED,
            {"REPLICA_BODY_BYTES_MAX": "lots"},
            None,
            ["body_bytes_max", "integer", "'lots'", "environment variable REPLICA_BODY_BYTES_MAX"],
        ),
        ({**REQUIRED, "page_items_max": "0"}, {}, None, ["page_items_max", "at least 1", "flag"]),
        (REQUIRED, {}, "max_drift_ms = -5", ["max_drift_ms", "at least 1", "replica.toml"]),
        (REQUIRED, {}, "body_bytes_max = true", ["body_bytes_max", "integer"]),
        (
            REQUIRED,
            {"REPLICA_LMDB_METASYNC": "maybe"},
            None,
            ["lmdb_metasync", "REPLICA_LMDB_METASYNC"],
        ),
        ({**REQUIRED, "region": "EU"}, {}, None, ["region", "'EU'", "flag --region"]),
        ({**REQUIRED, "region": "a" * 33}, {}, None, ["region", "[a-z]"]),
        ({**REQUIRED, "region": ""}, {}, None, ["region", "non-empty"]),
        ({**REQUIRED, "listen": "127.0.0.1"}, {}, None, ["listen", "HOST:PORT", "flag --listen"]),
        ({**REQUIRED, "listen": "::1:8001"}, {}, None, ["listen", "[::1]:8001"]),
        ({**REQUIRED, "listen": "127.0.0.1:web"}, {}, None, ["listen_port", "'web'", "--listen"]),
        ({**REQUIRED, "listen": "127.0.0.1:70000"}, {}, None, ["listen_port", "70000"]),
        ({**REQUIRED, "peer": ["us"]}, {}, None, ["peers", "NAME=URL", "flag --peer"]),
        ({**REQUIRED, "peer": ["us=ftp://h:21"]}, {}, None, ["peers", "http(s)://host:port"]),
        ({**REQUIRED, "peer": ["us=http://h"]}, {}, None, ["peers", "'us'", "host:port"]),
        ({**REQUIRED, "peer": ["us=http://h:1/api"]}, {}, None, ["peers", "host:port"]),
        ({**REQUIRED, "peer": ["US=http://h:1"]}, {}, None, ["peers", "'US'"]),
        (
            REQUIRED,
            {"REPLICA_PEERS": "us=http://a:1,us=http://b:1"},
            None,
            ["peers", "duplicate", "'us'", "REPLICA_PEERS"],
        ),
        ({**REQUIRED, "peer": ["eu=http://h:1"]}, {}, None, ["peers", "own region 'eu'", "--peer"]),
        ({**REQUIRED, "log_level": "loud"}, {}, None, ["log_level", "'loud'"]),
        (REQUIRED, {"REPLICA_EVENT_LOOP": "trio"}, None, ["event_loop", "'trio'", "uvloop"]),
        (
            REQUIRED,
            {"REPLICA_START_WRITES_WAIT_MS_MAX": "-1"},
            None,
            ["start_writes_wait_ms_max", "at least 0"],
        ),
        (
            REQUIRED,
            {"REPLICA_PEER_COMPRESSION": "gzip"},
            None,
            ["peer_compression", "'gzip'", "auto"],
        ),
        (
            {**REQUIRED, "consistency_wait_ms_default": "90000"},
            {},
            None,
            ["consistency_wait_ms_default", "consistency_wait_ms_max"],
        ),
        (REQUIRED, {"REPLICA_API_TOKEN": ""}, None, ["api_token", "REPLICA_API_TOKEN"]),
        ({**REQUIRED, "colour": "blue"}, {}, None, ["unknown setting", "colour"]),
    ],
)
def test_bad_configuration_names_the_setting_and_its_source(
    tmp_path: Path,
    flags: Mapping[str, object],
    env: dict[str, str],
    toml: str | None,
    expected: list[str],
) -> None:
    config = None if toml is None else _toml(tmp_path, toml)
    with pytest.raises(ConfigError) as error:
        _load(flags, env, config)
    for text in expected:
        assert text in str(error.value)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        _load(REQUIRED, {}, tmp_path / "absent.toml")


@pytest.mark.parametrize("listen", ["0.0.0.0:9000", "10.1.2.3:9000", "[::]:9000", "db.example:1"])
def test_non_loopback_listen_needs_cluster_secret_and_api_token(listen: str) -> None:
    flags = {**REQUIRED, "listen": listen}
    with pytest.raises(ConfigError, match=r"refusing to listen on .* --cluster-secret"):
        _load(flags)
    with pytest.raises(ConfigError, match=r"missing: --api-token\)"):
        _load({**flags, "cluster_secret": "s3cret"})
    with pytest.raises(ConfigError, match=r"missing: --cluster-secret\)"):
        _load(flags, {"REPLICA_API_TOKEN": "t0ken"})
    settings = _load({**flags, "cluster_secret": "s3cret"}, {"REPLICA_API_TOKEN": "t0ken"})
    assert (settings.cluster_secret, settings.api_token) == ("s3cret", "t0ken")


@pytest.mark.parametrize(
    ("listen", "host"),
    [
        ("127.0.0.1:9000", "127.0.0.1"),
        ("127.8.9.10:9000", "127.8.9.10"),
        ("[::1]:9000", "::1"),
        ("localhost:9000", "localhost"),
    ],
)
def test_loopback_listen_needs_no_secrets(listen: str, host: str) -> None:
    assert _load({**REQUIRED, "listen": listen}).listen_host == host


def test_secrets_are_hidden_from_redacted_and_repr() -> None:
    settings = _load({**REQUIRED, "cluster_secret": "s3cret", "peer": ["us=http://h:1"]})
    redacted = settings.redacted()
    assert redacted["cluster_secret"] == "***"
    assert redacted["api_token"] is None  # not configured, and the log should say so
    assert redacted["peers"] == {"us": "http://h:1"}
    assert redacted["data_dir"] == "data/eu"
    assert "s3cret" not in repr(redacted)
    assert "s3cret" not in repr(settings)


def test_cli_node_without_region_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["node"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("replica: error: missing region: use --region")


def test_cli_refuses_a_public_listen_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["node", "--region", "eu", "--data", str(tmp_path), "--listen", "0.0.0.0:9000"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("replica: error: refusing to listen on 0.0.0.0")
    assert "--cluster-secret" in err


def test_cli_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: replica" in capsys.readouterr().err


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings ``replica node`` runs a node with, in place of running it."""
    runs: list[Settings] = []

    def fake_run_node(settings: Settings) -> int:
        runs.append(settings)
        return 0

    monkeypatch.setattr(cli, "_load_runner", lambda: fake_run_node)
    return runs


def test_cli_passes_merged_settings_to_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, received: list[Settings]
) -> None:
    monkeypatch.setenv("REPLICA_API_TOKEN", "t0ken")
    monkeypatch.setenv("REPLICA_BODY_BYTES_MAX", "999")  # the flag below wins
    config = _toml(tmp_path, "page_items_max = 50\n")
    argv = ["node", "--region", "eu", "--data", str(tmp_path), "--listen", "0.0.0.0:9000"]
    argv += ["--peer", "us=http://10.0.0.2:8001", "--peer", "ap=http://10.0.0.3:8001"]
    argv += ["--cluster-secret", "s3cret", "--body-bytes-max", "2048", "--no-metasync"]
    argv += ["--config", str(config)]

    assert cli.main(argv) == 0
    assert received == [
        Settings(
            region="eu",
            data_dir=tmp_path,
            listen_host="0.0.0.0",
            listen_port=9000,
            peers=(Peer("us", "http://10.0.0.2:8001"), Peer("ap", "http://10.0.0.3:8001")),
            cluster_secret="s3cret",
            api_token="t0ken",
            body_bytes_max=2048,
            page_items_max=50,
            lmdb_metasync=False,
        )
    ]


def test_an_unknown_replica_variable_or_a_file_not_utf8_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """A typo (REPLICA_NO_METASYNC, REPLICA_DATA) left the setting at its default without
    a word, and a config file that is not text ended in a traceback (a review)."""
    for typo in ("REPLICA_NO_METASYNC", "REPLICA_DATA"):
        with pytest.raises(ConfigError, match=f"unknown environment variable.*{typo}.*data_dir"):
            _load(environ={typo: "1"})
    assert _load(environ={"REPLICA_LMDB_METASYNC": "false"}).lmdb_metasync is False
    binary = tmp_path / "replica.toml"
    binary.write_bytes(b'region = "\xff"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        _load(config_file=binary)
    with pytest.raises(
        ConfigError, match=r"unknown setting\(s\).*: data \(the settings: .*data_dir"
    ):
        _load(config_file=_toml(tmp_path, 'data = "x"\n'))


def test_cli_reads_the_config_file_replica_config_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, received: list[Settings]
) -> None:
    config = _toml(tmp_path, f'region = "us"\ndata_dir = "{tmp_path}"\n')
    monkeypatch.setenv("REPLICA_CONFIG", str(config))
    assert cli.main(["node"]) == 0
    assert [(s.region, s.data_dir) for s in received] == [("us", tmp_path)]


def test_cli_returns_the_runners_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_load_runner", lambda: lambda settings: 3)
    assert cli.main(["node", "--region", "eu", "--data", str(tmp_path)]) == 3


def test_cli_rebuild_views_calls_the_rebuilder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[tuple[Path, int | None]] = []

    def fake_rebuild_views(data_dir: Path, *, workers: int | None) -> int:
        received.append((data_dir, workers))
        return 0

    monkeypatch.setattr(cli, "_load_rebuilder", lambda: fake_rebuild_views)
    assert cli.main(["rebuild-views", "--data", str(tmp_path)]) == 0
    assert cli.main(["rebuild-views", "--data", str(tmp_path), "--workers", "1"]) == 0
    assert received == [(tmp_path, None), (tmp_path, 1)]
    with pytest.raises(SystemExit) as refused:
        cli.main(["rebuild-views", "--data", str(tmp_path), "--workers", "0"])
    assert refused.value.code == 2


def test_waits_at_start_may_be_zero_as_the_readme_tells_a_first_region() -> None:
    # README: start a new cluster's first region with REPLICA_BOOTSTRAP_WAIT_MS_MAX=0
    # (refused as "must be at least 1" before, found by a review).
    env = {"REPLICA_BOOTSTRAP_WAIT_MS_MAX": "0", "REPLICA_START_WRITES_WAIT_MS_MAX": "0"}
    settings = _load(REQUIRED, env, None)
    assert (settings.bootstrap_wait_ms_max, settings.start_writes_wait_ms_max) == (0, 0)
