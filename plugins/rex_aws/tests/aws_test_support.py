"""Helpers of rex-aws's tests: moto's server behind :class:`AwsFaults`, a WSGI layer that
logs every EC2 query-API action and answers the ones a test chooses with a genuine AWS
error document (moto cannot run out of capacity by itself), so boto3 parses real wire
errors. A uniquely named module, not the conftest: the tests dir is on sys.path, and
``conftest`` may name another directory's conftest when several test dirs run together.
"""

from __future__ import annotations

import io
import threading
import urllib.parse
import urllib.request
import uuid
from typing import Any

import attrs

__all__ = ["IMAGE_ID", "REGION", "AwsFaults", "Fault", "MotoServer"]

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
