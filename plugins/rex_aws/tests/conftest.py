"""Fixtures of rex-aws's tests: moto's server on a free port, spoken to over real HTTP.

Nothing patches boto3. In front of moto sits :class:`AwsFaults` (in ``aws_test_support``,
with the other helpers tests import), which injects the errors a test chooses on the wire.
No ``pytest_plugins`` here: only a top-level conftest may declare them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aws_test_support import REGION, AwsFaults, MotoServer

_FAKE_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto in server mode on a free port of 127.0.0.1, behind :class:`AwsFaults`; fake
    credentials in the environment, so boto3's standard chain finds them."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any) -> None:  # hundreds of requests per test run
            pass

    saved = {k: os.environ.get(k) for k in _FAKE_ENVIRONMENT}
    os.environ.update(_FAKE_ENVIRONMENT)
    faults = AwsFaults(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, faults, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-server", daemon=True)
    thread.start()
    try:
        yield MotoServer(f"http://127.0.0.1:{server.server_port}", faults)
    finally:
        server.shutdown()
        thread.join()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def aws(moto_server: MotoServer) -> MotoServer:
    """The moto server, emptied of every resource and fault left by earlier tests."""
    moto_server.reset()
    return moto_server
