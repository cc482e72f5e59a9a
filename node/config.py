"""Settings for one replica node: flags > ``REPLICA_*`` environment > TOML file > defaults.

Validated here, once; errors name the setting and its source. Secrets never reach a log.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from node.event_loop import EVENT_LOOP_DEFAULT, EVENT_LOOPS
from node.lmdb_kv import MAP_BYTES_INITIAL


@dataclass(frozen=True, slots=True)
class Peer:
    name: str  # region name of the peer, e.g. "us"
    url: str  # e.g. "http://127.0.0.1:8002", without a trailing slash


@dataclass(frozen=True, slots=True)
class Settings:
    region: str
    data_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8001
    peers: tuple[Peer, ...] = ()
    cluster_secret: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    body_bytes_max: int = 1_048_576
    # A connection's first request must arrive (its head) within this, and any request's
    # body within the other, or it is closed / answered 408 (``node.deadlines``).
    request_head_wait_ms: int = 10_000
    request_body_wait_ms: int = 30_000
    idle_connection_wait_ms: int = 15_000  # a kept-alive connection idle this long closes
    connections_max: int = 8_192  # open at once (fewer if RLIMIT_NOFILE allows fewer)
    commit_batch_requests_max: int = 512
    write_queue_requests_max: int = 10_000
    consistency_wait_ms_default: int = 5_000
    consistency_wait_ms_max: int = 60_000
    changes_wait_ms_max: int = 30_000
    page_items_max: int = 1_000
    max_drift_ms: int = 60_000
    lmdb_map_bytes_initial: int = MAP_BYTES_INITIAL
    lmdb_metasync: bool = True  # False: faster commits; an OS crash may lose the last one
    # Write events as the version before does (field writes naming no create, event format
    # 1), which it reads: for a rolling upgrade from it, until every region runs this one.
    previous_format: bool = False
    log_level: str = "info"
    event_loop: str = EVENT_LOOP_DEFAULT  # "uvloop" or "asyncio" (see node/event_loop.py)
    gossip_interval_ms: int = 500
    # How sync messages reach peers: "stream" (one signed WebSocket per peer; HTTP for a
    # peer without one) or "http" (one signed POST per round trip).
    peer_transport: str = "stream"
    # Whether a peer stream is compressed (permessage-deflate, each stream its own window):
    # "auto" on links without TLS only, where compression reveals nothing a reader of the
    # traffic does not see anyway; "on" over TLS too; "off" never. See README, Replication.
    peer_compression: str = "auto"
    sync_batch_bytes_max: int = 1_048_576
    sync_body_bytes_max: int = 8 * 1_048_576
    push_queue_events_max: int = 10_000
    backoff_max_ms: int = 1_000
    auth_window_ms: int = 60_000  # as max_drift_ms: a clock the HLC follows still replicates
    bootstrap_wait_ms_max: int = 120_000
    start_writes_wait_ms_max: int = 3_000
    # TLS between nodes: a certificate and key to serve and to present; with a CA, peers'
    # certificates are verified against it (mutual TLS) instead of the system's roots.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Where the node keeps its record of how far its counter went this boot, outside the
    # data directory (``node.counter_record``); None: the first writable of /run, the
    # user's run directory and the temporary directory.
    run_dir: Path | None = None

    def redacted(self) -> dict[str, object]:
        """All settings as plain values for a start-up log line, secrets replaced by "***"."""
        hidden = {name: None if getattr(self, name) is None else "***" for name in _SECRETS}
        peers = {peer.name: peer.url for peer in self.peers}
        paths = {
            name: None if getattr(self, name) is None else str(getattr(self, name))
            for name in _PATHS
        }
        return {**asdict(self), **hidden, **paths, "peers": peers}


class ConfigError(ValueError):
    """A configuration problem; the message is shown to the user as-is."""


# Setting name -> (raw value, where it came from, e.g. "environment variable REPLICA_REGION").
_Raw = dict[str, tuple[object, str]]

_FIELDS = tuple(f.name for f in fields(Settings))
_SECRETS = ("cluster_secret", "api_token")
_PATHS = ("data_dir", "tls_cert", "tls_key", "tls_ca", "run_dir")  # plain text in the log, not Path
# Every int setting but the port is a limit (annotations are strings here, see __future__).
_LIMITS = tuple(f.name for f in fields(Settings) if f.type == "int" and f.name != "listen_port")
_FLAG_NAMES = {"data_dir": "--data", "peers": "--peer", "lmdb_metasync": "--no-metasync"}
REGION_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
PORT_MAX = 65535
_INT = re.compile(r"\s*-?\d+\s*")
_BOOLS = {"true": True, "1": True, "false": False, "0": False}
_LOG_LEVELS = ("debug", "info", "warning", "error")
PEER_TRANSPORTS = ("stream", "http")
PEER_COMPRESSIONS = ("auto", "on", "off")


def load_settings(
    flags: Mapping[str, object], *, environ: Mapping[str, str], config_file: Path | None
) -> Settings:
    """``flags`` holds only the flags passed: field names, ``listen`` and ``peer`` (a list)."""
    raw: _Raw = {}
    if config_file is not None:
        raw.update(_from_file(config_file))
    raw.update(_from_environ(environ))
    raw.update(_from_flags(flags))
    for name in ("region", "data_dir"):
        if name not in raw:
            raise ConfigError(f"missing {name}: use {_flag_name(name)} or REPLICA_{name.upper()}")
    settings = Settings(**{name: _CONVERTERS[name](name, v, w) for name, (v, w) in raw.items()})
    _check_across(settings, raw)
    return settings


def _from_flags(flags: Mapping[str, object]) -> _Raw:
    raw: _Raw = {}
    for key, value in flags.items():
        name = "peers" if key == "peer" else key
        if name not in (*_FIELDS, "listen"):
            raise ConfigError(f"unknown setting {key!r} (from the command line)")
        raw[name] = (value, f"flag {_flag_name(name)}")
    return _split_listen(raw)


ENVIRON_PREFIX = "REPLICA_"
ENVIRON_OTHERS = ("REPLICA_CONFIG",)  # the --config file's path (replica node reads it)


def _from_environ(environ: Mapping[str, str]) -> _Raw:
    known = {f"{ENVIRON_PREFIX}{name.upper()}" for name in (*_FIELDS, "listen")}
    unknown = sorted(
        v for v in environ if v.startswith(ENVIRON_PREFIX) and v not in known | {*ENVIRON_OTHERS}
    )
    if unknown:  # a typo would leave a setting at its default without a word
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(unknown)}: a setting's variable is "
            f"REPLICA_ and its name in capitals ({setting_names()}; e.g. REPLICA_DATA_DIR, "
            "REPLICA_LMDB_METASYNC=false), or REPLICA_CONFIG for --config"
        )
    raw: _Raw = {}
    for name in (*_FIELDS, "listen"):
        variable = f"REPLICA_{name.upper()}"
        if variable in environ:
            value: object = environ[variable]
            if name == "peers":
                value = [item.strip() for item in environ[variable].split(",") if item.strip()]
            raw[name] = (value, f"environment variable {variable}")
    return _split_listen(raw)


def _from_file(path: Path) -> _Raw:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text: {error}") from error
    unknown = sorted(set(data) - {*_FIELDS, "listen"})
    if unknown:
        raise ConfigError(
            f"unknown setting(s) in config file {path}: {', '.join(unknown)} (the settings: "
            f"{setting_names()})"
        )
    return _split_listen({name: (value, f"config file {path}") for name, value in data.items()})


def setting_names() -> str:
    """Every setting's name, as a TOML key (``REPLICA_`` and it in capitals: its variable)."""
    return ", ".join(["listen (HOST:PORT)", *(n for n in _FIELDS if n not in LISTEN_PARTS)])


LISTEN_PARTS = ("listen_host", "listen_port")  # ``listen`` sets both


def _split_listen(raw: _Raw) -> _Raw:
    """Turn a "HOST:PORT" ``listen`` entry into listen_host and listen_port, same source."""
    if "listen" not in raw:
        return raw
    value, where = raw.pop("listen")
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if host.startswith("[") and host.endswith("]"):  # IPv6, as in "[::1]:8001"
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an unbracketed IPv6 address: its last group would be read as the port
    if not host or not port:
        _fail("listen", where, f"must be HOST:PORT, e.g. 127.0.0.1:8001 or [::1]:8001: {value!r}")
    # listen wins over listen_host/listen_port given in the same source.
    return {**raw, "listen_host": (host, where), "listen_port": (port, where)}


def _check_across(settings: Settings, raw: _Raw) -> None:
    if settings.consistency_wait_ms_default > settings.consistency_wait_ms_max:
        where = raw.get("consistency_wait_ms_default", (None, "the default"))[1]
        _fail("consistency_wait_ms_default", where, "must not exceed consistency_wait_ms_max")
    if any(peer.name == settings.region for peer in settings.peers):
        _fail("peers", raw["peers"][1], f"must not include the own region {settings.region!r}")
    if settings.peers and settings.cluster_secret is None:
        # Replication requests are authenticated with it; without one, no peer is trusted.
        _fail("peers", raw["peers"][1], "need a cluster secret (--cluster-secret)")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        _fail(
            "tls_cert",
            raw.get("tls_cert", raw.get("tls_key", (None, "settings")))[1],
            "and tls_key go together",
        )
    missing = [_flag_name(name) for name in _SECRETS if getattr(settings, name) is None]
    if missing and not _is_loopback(settings.listen_host):
        # Off loopback, anyone who can reach the port could write or join the cluster.
        raise ConfigError(
            f"refusing to listen on {settings.listen_host} without --cluster-secret and --api-token"
            f" (missing: {', '.join(missing)}); set both (or REPLICA_CLUSTER_SECRET and"
            " REPLICA_API_TOKEN) or listen on a loopback address"
        )


def _is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other host name may resolve to anything
        return False


def _flag_name(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _fail(name: str, where: str, problem: str) -> NoReturn:
    raise ConfigError(f"{name} {problem} (from {where})")


def _text(name: str, value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(name, where, "must be a non-empty string")  # never echo: it may be a secret
    return value


def _int(name: str, value: object, where: str, low: int = 1, high: int | None = None) -> int:
    """A positive limit unless ``low``/``high`` (inclusive) say otherwise."""
    number = int(value) if isinstance(value, str) and _INT.fullmatch(value) else value
    if not isinstance(number, int) or isinstance(number, bool):
        _fail(name, where, f"must be an integer, got {value!r}")
    if number < low or (high is not None and number > high):
        most = "" if high is None else f" and at most {high}"
        _fail(name, where, f"must be at least {low}{most}, got {number}")
    return number


def _bool(name: str, value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    _fail(name, where, f"must be true, false, 1 or 0, got {value!r}")


def _region(name: str, value: object, where: str) -> str:
    region = _text(name, value, where)
    if not REGION_RE.fullmatch(region):
        _fail(name, where, f"must match [a-z][a-z0-9-]{{0,31}}, got {region!r}")
    return region


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object, str], str]:
    """A converter to one of ``choices``, whatever the case it was given in."""

    def convert(name: str, value: object, where: str) -> str:
        choice = _text(name, value, where).lower()
        if choice not in choices:
            _fail(name, where, f"must be one of {', '.join(choices)}, got {choice!r}")
        return choice

    return convert


def _file(name: str, value: object, where: str) -> Path:
    path = Path(_text(name, value, where))
    if not path.is_file():
        _fail(name, where, f"must be a readable file, got {str(path)!r}")
    return path


def _peers(name: str, value: object, where: str) -> tuple[Peer, ...]:
    if isinstance(value, dict):  # a [peers] table in the config file
        pairs = list(value.items())
    elif isinstance(value, list | tuple) and all(isinstance(i, str) and "=" in i for i in value):
        pairs = [item.partition("=")[::2] for item in value]
    else:
        _fail(name, where, f"must be NAME=URL entries or a [peers] table, got {value!r}")
    peers: list[Peer] = []
    for peer_name, url in pairs:
        region = _region(f"{name} entry", peer_name, where)
        if any(peer.name == region for peer in peers):
            _fail(name, where, f"has a duplicate peer name {region!r}")
        peers.append(Peer(region, _peer_url(name, region, url, where)))
    return tuple(peers)


def _peer_url(name: str, region: str, url: object, where: str) -> str:
    parts = urlsplit(url if isinstance(url, str) else "")
    try:
        port = parts.port
    except ValueError:  # out of range or not a number
        port = None
    extra = parts.username is not None or parts.path.strip("/") or parts.query or parts.fragment
    if parts.scheme not in ("http", "https") or not parts.hostname or not port or extra:
        _fail(name, where, f"URL for {region!r} must be http(s)://host:port, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


_CONVERTERS: dict[str, Callable[[str, object, str], Any]] = {
    "region": _region,
    "data_dir": lambda name, value, where: Path(_text(name, value, where)),
    "listen_host": _text,
    "listen_port": lambda name, value, where: _int(name, value, where, 0, PORT_MAX),  # 0: any free
    "peers": _peers,
    "cluster_secret": _text,
    "api_token": _text,
    "lmdb_metasync": _bool,
    "previous_format": _bool,
    "log_level": _one_of(_LOG_LEVELS),
    "event_loop": _one_of(EVENT_LOOPS),
    "peer_transport": _one_of(PEER_TRANSPORTS),
    "peer_compression": _one_of(PEER_COMPRESSIONS),
    **{name: _file for name in ("tls_cert", "tls_key", "tls_ca")},
    "run_dir": lambda name, value, where: Path(_text(name, value, where)),
    **{name: _int for name in _LIMITS},
    # 0: no wait (a cluster's first region, nothing to catch up on)
    **{
        name: lambda name, value, where: _int(name, value, where, low=0)
        for name in ("start_writes_wait_ms_max", "bootstrap_wait_ms_max")
    },
}
assert set(_CONVERTERS) == set(_FIELDS), "every setting needs exactly one converter"
