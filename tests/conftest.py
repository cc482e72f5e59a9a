from collections.abc import Iterator
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings

# Laws are checked on hundreds of examples; no per-example deadline on a shared 2-core box.
settings.register_profile(
    "default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("default")


@pytest.fixture(autouse=True, scope="session")
def _counter_records_in_a_run_dir_of_the_tests(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """Replicas opened in the tests' own process keep their counter records in a run
    directory of the session's, not in the machine's (node processes the tests start
    use theirs unless given ``--run-dir``)."""
    run = tmp_path_factory.mktemp("run")
    with mock.patch("node.counter_record.run_dirs", return_value=[run]):
        yield
