"""Test-wide settings for tests/ and plugins/*/tests.

Async tests (and the rexd they start in their own loop) run on the event loop rexd runs
on by default, uvloop where it is installed; ``REX_TEST_EVENT_LOOP=asyncio`` runs them on
the standard library's loop instead (``auto`` and ``uvloop`` are the other values, as in
the config's ``event_loop``). Tests that start ``rexd`` as a process cover each loop too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from rexcore.core.loop import chosen_event_loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    if chosen_event_loop(os.environ.get("REX_TEST_EVENT_LOOP", "auto")) == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    import asyncio

    return {"asyncio": asyncio.new_event_loop}
