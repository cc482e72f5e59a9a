"""``run_on`` runs a coroutine on the loop it names, and refuses any other name."""

from __future__ import annotations

import inspect

import pytest

from node.event_loop import EVENT_LOOPS, run_on, running_loop_name


async def _which() -> str:
    return running_loop_name()


@pytest.mark.parametrize("name", EVENT_LOOPS)
def test_a_coroutine_runs_on_the_named_loop(name: str) -> None:
    assert run_on(name, _which()) == name


def test_an_unknown_loop_is_refused_and_the_coroutine_closed() -> None:
    main = _which()
    with pytest.raises(ValueError, match="'trio'"):
        run_on("trio", main)
    # closed, so no "never awaited" warning either
    assert inspect.getcoroutinestate(main) == inspect.CORO_CLOSED
