"""A node refuses to start where starting would be wrong, and says why."""

from __future__ import annotations

import signal
import subprocess
import time

from node.process import free_port, node_command
from tests.e2e.helpers import Nodes, call, node_env

WARNED_WAIT_S = 10.0  # a node's first sync rounds with its peer
READY_WAIT_S = 20.0  # a node's start, and its stop


def test_wrong_region_on_a_data_directory_is_refused(nodes: Nodes) -> None:
    node = nodes.start("eu")
    assert node.call("POST", "/groups", {"id": "springfield", "name": "Springfield"}).status == 201
    assert node.terminate() == 0, node.stderr()

    refused = nodes.run("us", "eu", f"127.0.0.1:{free_port()}")
    assert refused.returncode != 0, refused.stderr
    assert "'eu'" in refused.stderr, refused.stderr
    assert "'us'" in refused.stderr, refused.stderr
    assert "listening" not in refused.stdout

    # and the directory is untouched: eu still starts on it, with its data
    again = nodes.start("eu")
    assert again.call("GET", "/groups/springfield").status == 200


def test_a_data_directory_in_use_is_refused(nodes: Nodes) -> None:
    node = nodes.start("eu")
    refused = nodes.run("eu", "eu", f"127.0.0.1:{free_port()}")
    assert refused.returncode != 0, refused.stderr
    assert "in use by another replica process" in refused.stderr, refused.stderr
    assert str(nodes.data_dir("eu")) in refused.stderr, refused.stderr
    assert "listening" not in refused.stdout
    # the first node is unharmed
    assert node.alive()
    assert node.call("GET", "/health").json() == {"status": "ok"}


def test_non_loopback_listen_without_secrets_is_refused(nodes: Nodes) -> None:
    refused = nodes.run("eu", "eu", f"0.0.0.0:{free_port()}")
    assert refused.returncode == 2, refused.stderr
    assert "cluster-secret" in refused.stderr, refused.stderr
    assert "api-token" in refused.stderr, refused.stderr
    assert "listening" not in refused.stdout
    assert not nodes.data_dir("eu").exists()  # refused before touching anything


def test_a_node_serves_on_the_event_loop_it_is_told(nodes: Nodes) -> None:
    default = nodes.start("eu")
    assert default.ready_line.endswith("(uvloop)"), default.ready_line
    created = default.call("POST", "/groups", {"id": "springfield", "name": "Springfield"})
    assert created.status == 201
    assert default.terminate() == 0, default.stderr()

    plain = nodes.start("eu", None, "--event-loop", "asyncio")
    assert plain.ready_line.endswith("(asyncio)"), plain.ready_line
    assert plain.call("GET", "/groups/springfield").json()["name"] == "Springfield"
    assert plain.terminate() == 0, plain.stderr()


def test_an_unknown_event_loop_is_refused(nodes: Nodes) -> None:
    refused = nodes.run("eu", "eu", f"127.0.0.1:{free_port()}", "--event-loop", "trio")
    assert refused.returncode == 2, refused.stderr
    assert "event_loop" in refused.stderr, refused.stderr
    assert "'trio'" in refused.stderr, refused.stderr
    assert "listening" not in refused.stdout
    assert not nodes.data_dir("eu").exists()  # refused before touching anything


def _refused_plainly(refused: subprocess.CompletedProcess[str], *said: str) -> None:
    """Exit 2, one ``replica: error:`` line saying ``said``, no traceback, not listening."""
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("replica: error: "), refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    for words in said:
        assert words in refused.stderr, refused.stderr
    assert "listening" not in refused.stdout


def test_a_data_directory_that_cannot_be_one_is_refused_plainly(nodes: Nodes) -> None:
    """An operator's slip (a file where the directory goes, a path under a file, a path no
    one may make) is a one-line error, not a traceback (found by a review)."""
    a_file = nodes.root / "a-file"
    a_file.write_text("not a directory")
    listen = f"127.0.0.1:{free_port()}"
    _refused_plainly(nodes.run("eu", "a-file", listen), str(a_file), "is a file")
    _refused_plainly(nodes.run("eu", "a-file/eu", listen), "Not a directory")
    _refused_plainly(nodes.run("eu", "/proc/no-such-dir", listen), "No such file or directory")


def test_tls_files_that_do_not_load_are_refused_plainly(nodes: Nodes) -> None:
    junk = nodes.root / "junk.pem"
    junk.write_text("not a certificate")
    refused = nodes.run(
        "eu", "eu", f"127.0.0.1:{free_port()}", "--tls-cert", str(junk), "--tls-key", str(junk)
    )
    _refused_plainly(refused, "TLS files", str(junk))
    assert not nodes.data_dir("eu").exists()  # refused before touching anything


def test_a_run_directory_named_but_unusable_is_refused(nodes: Nodes) -> None:
    """A named ``--run-dir`` that cannot hold the counter records (shared with other users,
    a file) stops the start: running without them would leave a restored copy's dots to
    its peers alone, and the operator asked for them."""
    shared = nodes.root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    listen = f"127.0.0.1:{free_port()}"
    refused = nodes.run("eu", "eu", listen, "--run-dir", str(shared))
    _refused_plainly(refused, str(shared), "writable by other users")
    a_file = nodes.root / "a-file"
    a_file.write_text("")
    _refused_plainly(nodes.run("eu", "eu", listen, "--run-dir", str(a_file)), "not a directory")
    assert not nodes.data_dir("eu").exists()


def test_a_peer_url_pointing_at_another_region_is_warned_of(nodes: Nodes) -> None:
    """``--peer us=<ap's URL>`` started without a word, and /status showed peer us with
    ap's replica id (found by a review)."""
    secret = ("--cluster-secret", "s3cret-of-the-cluster")
    ap = nodes.start("ap", None, *secret)
    eu = nodes.start("eu", None, *secret, "--peer", f"us={ap.url}")
    deadline = time.monotonic() + WARNED_WAIT_S
    while "answers as" not in eu.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = eu.stderr()
    assert "the peer configured as 'us' answers as ap~" in log, log
    assert log.count("answers as") == 1, log  # once, not every round


def test_a_node_whose_stdout_is_a_full_disk_serves_all_the_same(nodes: Nodes) -> None:
    """The 'listening' line is the one thing a node prints; on a full disk (a log file
    beside the data, on the disk that filled) printing it killed every start (found by
    a review). Now it is a warning on stderr, and the node serves."""
    port = free_port()
    log = nodes.root / "full.stderr"
    command = node_command("eu", nodes.data_dir("eu"), f"127.0.0.1:{port}")
    with log.open("wb") as stderr, open("/dev/full", "wb") as full:
        proc = subprocess.Popen(command, stdout=full, stderr=stderr, env=node_env())
    try:
        deadline = time.monotonic() + READY_WAIT_S
        while "cannot write the listening line" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        assert call(url, "POST", "/groups", {"id": "homer", "name": "Homer"}).status == 201
        assert call(url, "GET", "/groups/homer").json()["name"] == "Homer"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=READY_WAIT_S) == 0, log.read_text()
