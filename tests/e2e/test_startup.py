"""A node refuses to start where starting would be wrong, and says why."""

from __future__ import annotations

from node.process import free_port
from tests.e2e.helpers import Nodes


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
