"""What ``ec2`` and ``s3`` share: clients from the standard boto3 chain, probes, error codes.

boto3 is imported here lazily (inside functions), so registering the plugin costs nothing
and ``rexd plugins list`` works even where boto3 is broken: the probe says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from rexcore.plugins.descriptors import ProbeResult

__all__ = ["AwsCaller", "error_code", "error_text", "make_client", "probe_aws"]

T = TypeVar("T")


def make_client(service: str, *, region: str, endpoint_url: str, max_attempts: int,
                max_connections: int = 10) -> Any:
    """A boto3 client whose credentials come only from the standard chain (environment,
    shared files, SSO, container or instance role): rex never takes keys in its config."""
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=max_connections,
        user_agent_extra="rex-aws",
    )
    with _sessions_lock:  # botocore sessions are not thread-safe; clients are
        session = _sessions.get(region)
        if session is None:
            import boto3

            session = _sessions[region] = boto3.session.Session(region_name=region or None)
        return session.client(service, endpoint_url=endpoint_url or None, config=config)


# One session per region for the process: each new session loads the service models
# again (about half a second for S3), and credentials refresh themselves within one.
_sessions: dict[str, Any] = {}
_sessions_lock = threading.Lock()


def probe_aws(component: str) -> ProbeResult:
    """Unavailable, with the reason, when boto3's chain finds no credentials or region."""
    try:
        import boto3
    except ImportError as exc:
        return ProbeResult.unavailable(f"boto3 cannot be imported ({exc}); reinstall rex-aws")
    session = boto3.session.Session()
    if session.get_credentials() is None:
        return ProbeResult.unavailable(
            "no AWS credentials found by the boto3 chain (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, SSO, a container or instance "
            f"role); configure one of them for the {component} component"
        )
    if not session.region_name:
        return ProbeResult.unavailable(
            "no AWS region found by the boto3 chain; set AWS_DEFAULT_REGION (or a "
            f"profile's region), or the {component} component's `region` option"
        )
    return ProbeResult.ok()


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` ("" for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def error_text(exc: BaseException) -> str:
    """``Code: message`` of a ClientError, else the exception's type and text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


class AwsCaller:
    """Runs blocking boto3 calls in a bounded pool of threads, so the event loop stays free
    and at most ``threads`` requests are in flight."""

    def __init__(self, threads: int, name: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=name)

    async def __call__(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown)
