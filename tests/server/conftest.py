"""Fixtures shared by the server tests: the reference engine, a served tiny model, a client, a slow server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.engine.engine import Engine
from service.server.app import TranslatorServer
from tests.support.server import Client, SlowBackend, make_config, running, slow_config, slow_engine

# Module scope: each test file gets its own server. Tests that need other settings (overload, TLS, SIGTERM to
# a `translator-serve` subprocess) start servers of their own.


@pytest.fixture(scope="module")
def reference(tiny_repository: Path) -> Engine:
    return Engine.load(tiny_repository, "tiny", device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(tiny_repository: Path) -> Iterator[TranslatorServer]:
    with running(make_config(tiny_repository)) as instance:
        yield instance


@pytest.fixture
def client(server: TranslatorServer) -> Iterator[Client]:
    assert server.port
    connection = Client(server.port)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def slow(tiny_repository: Path) -> Iterator[tuple[TranslatorServer, SlowBackend]]:
    engine, backend = slow_engine(tiny_repository)
    config = slow_config(tiny_repository, iteration_batching="on")
    with running(config, engine=engine) as instance:
        yield instance, backend
