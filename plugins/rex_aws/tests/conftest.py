"""Fixtures of rex-aws's tests: moto's server on a free port, spoken to over real HTTP.

Nothing patches boto3. In front of moto sits :class:`AwsFaults`, a WSGI layer that logs
every EC2 query-API action and answers the ones a test chooses with a genuine AWS error
document (moto cannot run out of capacity by itself), so boto3 parses real wire errors.
No ``pytest_plugins`` here: only a top-level conftest may declare them.
"""

from __future__ import annotations

import io
import os
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

REGION = "us-east-1"
#: moto accepts any image id; this one reads like a real one.
IMAGE_ID = "ami-0123456789abcdef0"

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>{request}</RequestID></Response>"
)


@attrs.define
class Fault:
    """Answer ``action`` requests whose parameters include ``where`` with error ``code``,
    ``times`` times (None: every time)."""

    action: str
    code: str
    where: dict[str, str] = attrs.field(factory=dict)
    times: int | None = None
    status: int = 500

    def matches(self, form: dict[str, str]) -> bool:
        return (form.get("Action") == self.action and self.times != 0
                and all(form.get(k) == v for k, v in self.where.items()))


class AwsFaults:
    """WSGI middleware: records EC2 actions, injects the chosen faults, passes the rest."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.faults: list[Fault] = []
        #: Every EC2 request as its form parameters, with ``Failed`` set on injected ones.
        self.calls: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def fail(self, action: str, code: str, *, times: int | None = None, status: int = 500,
             **where: str) -> Fault:
        fault = Fault(action, code, where, times, status)
        self.faults.append(fault)
        return fault

    def actions(self, *names: str) -> list[dict[str, str]]:
        return [c for c in self.calls if c["Action"] in names]

    def reset(self) -> None:
        self.faults.clear()
        self.calls.clear()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            return self.app(environ, start_response)
        form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        if "Action" not in form:
            return self.app(environ, start_response)
        with self._lock:
            self.calls.append(form)
            fault = next((f for f in self.faults if f.matches(form)), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
        if fault is None:
            return self.app(environ, start_response)
        form["Failed"] = fault.code
        document = _ERROR_XML.format(code=fault.code, message=f"injected by the test: {fault.code}",
                                     request=uuid.uuid4()).encode()
        start_response(f"{fault.status} Injected", [("Content-Type", "text/xml"),
                                                    ("Content-Length", str(len(document)))])
        return [document]


@attrs.define
class MotoServer:
    endpoint_url: str
    faults: AwsFaults

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint_url)

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        self.faults.reset()


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
