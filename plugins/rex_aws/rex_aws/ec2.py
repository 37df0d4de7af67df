"""The ``ec2`` provider: each worker is one EC2 instance running ``rexd worker``.

An instance is tagged ``rex:pool = <pool>`` (plus the configured tags, never the join
token) and its user-data (:mod:`rex_aws.userdata`) installs and starts ``rexd worker`` with
the instance id as worker id, so the coordinator and the pool name workers alike.

Draining: the coordinator has no call to drain a worker from afar, and a worker drains on
SIGTERM. So :meth:`Ec2Provider.drain` tags the instance ``rex:drain = <unix time>``; the
user-data's watcher reads its own tags from the instance metadata service, sends SIGTERM
to the worker, and once the worker has finished its actions and exited, shuts the instance
down (``InstanceInitiatedShutdownBehavior = terminate``: it ends itself, nothing is left
to bill). The pool then sees the instance gone and calls :meth:`terminate`, which is
idempotent. An instance still draining after ``drain_timeout_s`` is reported failed, so
the pool terminates it outright.

Capacity: the choices are ``instance_types`` x ``subnets`` in order (spot first when
``spot`` is on, then on-demand if ``spot_fallback``). A capacity error moves on to the next
subnet, a quota error to the next instance type; throttling is retried with backoff by
botocore (``api_max_attempts``) and then by the pool, which retries a failed create after a
doubling delay.

A private CA: with ``coordinator_ca_file`` the provider reads that PEM bundle once, when
it is built, and refuses (:class:`Ec2OptionsError`, a ``ValueError``) a file it cannot
read, one without a certificate or that ssl cannot load, one holding a private key, and
options whose user-data would be over EC2's 16 KiB with it; a launch checks the size again
with the launch's own values. The user-data writes the bundle on the instance and starts
the worker with ``--ca-file``. The CA only serves an ``https://`` coordinator, so a
plain ``http://`` one with it is a mistake, not a choice: the options refuse such a
``coordinator_url`` when the config loads, and a launch refuses a non-``https://`` URL too
(rather than workers that ignore the CA and talk in clear text).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from rex_aws._aws import AwsCaller, error_code, error_text, make_client
from rex_aws.options import Ec2ProviderOptions
from rex_aws.userdata import USER_DATA_LIMIT, render_user_data
from rexcore.plugins.descriptors import ComponentContext
from rexcore.providers.interface import (
    ProvidedWorker,
    ProvidedWorkerState,
    ProviderError,
    WorkerLaunch,
)

__all__ = ["DRAIN_TAG", "POOL_TAG", "Ec2OptionsError", "Ec2Provider", "create_ec2_provider"]

log = logging.getLogger(__name__)

POOL_TAG = "rex:pool"
DRAIN_TAG = "rex:drain"
MARKET_TAG = "rex:market"

#: No room for this instance type here right now: another subnet (zone) may have some.
_CAPACITY_ERRORS = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "InsufficientFreeAddressesInSubnet", "Unsupported",
})
#: An account limit for the type (or its family, or spot): other subnets will not help.
_QUOTA_ERRORS = frozenset({
    "InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
})
_GONE = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
_LIVE_STATES = ["pending", "running", "stopping", "stopped"]
_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"


class Ec2OptionsError(ProviderError, ValueError):
    """Options the provider cannot be built with: a ``ValueError`` like the options' own
    checks, and a :class:`ProviderError`, which rexd reports in one line at startup."""


@attrs.frozen
class _Choice:
    spot: bool
    instance_type: str | None
    subnet: str | None

    def __str__(self) -> str:
        return (f"{'spot' if self.spot else 'on-demand'} {self.instance_type or 'template type'}"
                f" in {self.subnet or 'the default subnet'}")


def _read_ca_bundle(path: str) -> str:
    """The PEM text of ``coordinator_ca_file``; raises :class:`Ec2OptionsError`."""
    where = f"coordinator_ca_file {path!r}"
    try:
        with open(path, "rb") as file:
            data = file.read(USER_DATA_LIMIT + 1)
    except OSError as exc:
        raise Ec2OptionsError(f"{where} cannot be read ({exc.strerror or exc}); give a PEM "
                              "file of the CA(s) that signed the coordinator's certificate, "
                              "readable by rexd") from None
    if len(data) > USER_DATA_LIMIT:
        raise Ec2OptionsError(f"{where} is over {USER_DATA_LIMIT} bytes, more than EC2 "
                              "user-data can carry; keep only the CA(s) that signed the "
                              "coordinator's certificate")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if _PEM_CERTIFICATE not in text:
        raise Ec2OptionsError(f"{where} holds no PEM certificate (no '{_PEM_CERTIFICATE}' "
                              "line); give the CA certificate in PEM form (openssl x509 "
                              "-inform der -in CA.der -out CA.pem converts a DER one)")
    if "PRIVATE KEY-----" in text:
        raise Ec2OptionsError(f"{where} holds a private key, which the user-data would "
                              "hand to every worker; give only the CA certificate(s)")
    try:  # as the worker will: RexClient loads it with ssl
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as exc:
        raise Ec2OptionsError(f"{where} is not a bundle of certificates a worker can load "
                              f"({exc}); give the CA certificate(s) in PEM form") from None
    return text


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Ec2Provider:
    """A :class:`~rexcore.providers.interface.WorkerProvider` on EC2."""

    def __init__(self, options: Ec2ProviderOptions, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.options = options
        #: Wall-clock seconds; drain times are stored in tags, so they survive a restart.
        self.clock = clock
        #: The PEM text of ``coordinator_ca_file``, read once; empty without one.
        self.ca_bundle = _read_ca_bundle(options.coordinator_ca_file) if (
            options.coordinator_ca_file) else ""
        # Fail at startup what no launch could fix: the launch adds only a few hundred
        # bytes (URL, token, properties) to what the options alone render to.
        fixed = render_user_data(WorkerLaunch(options.coordinator_url), options.coordinator_url,
                                 options, self.ca_bundle)
        if len(fixed.encode()) > USER_DATA_LIMIT:
            raise Ec2OptionsError(self._too_large(fixed))
        self._call = AwsCaller(4, "rex-ec2")
        self._client: Any = None

    async def _ec2(self) -> Any:
        if self._client is None:
            try:
                self._client = await self._call(
                    make_client, "ec2", region=self.options.region,
                    endpoint_url=self.options.endpoint_url,
                    max_attempts=self.options.api_max_attempts)
            except Exception as exc:  # no region, a malformed endpoint_url...
                raise self._fail(exc, "creating its EC2 client") from exc
        return self._client

    def _fail(self, exc: Exception, doing: str) -> ProviderError:
        return ProviderError(f"ec2 provider (pool {self.options.pool!r}) failed {doing}: "
                             f"{error_text(exc)}; check the provider's options, the IAM "
                             "permissions (docs/aws.md) and the account's EC2 quotas")

    def _too_large(self, user_data: str) -> str:
        return (f"ec2 provider (pool {self.options.pool!r}): the user-data is "
                f"{len(user_data.encode())} bytes, over EC2's limit of {USER_DATA_LIMIT}; "
                "shorten install_command (e.g. bake rexd into the image) or keep only the CA "
                "that signed the coordinator's certificate in coordinator_ca_file")

    # -- creating ------------------------------------------------------------------

    def _choices(self) -> Iterator[_Choice]:
        types: list[str | None] = list(self.options.instance_types) or [None]
        subnets: list[str | None] = list(self.options.subnets) or [None]
        markets = [True, False] if self.options.spot and self.options.spot_fallback else (
            [self.options.spot])
        for spot in markets:
            for instance_type in types:
                for subnet in subnets:
                    yield _Choice(spot, instance_type, subnet)

    def _coordinator_url(self, launch: WorkerLaunch) -> str:
        url = self.options.coordinator_url or launch.coordinator_url
        if _is_loopback(url):
            raise ProviderError(
                f"ec2 workers cannot reach the coordinator at {url}, a loopback address; set "
                "pool.provider.options.coordinator_url to a URL the instances reach (and "
                "protocols.native.listen to an interface they can connect to)")
        if not launch.join_token:
            raise ProviderError(
                "ec2 workers join from other hosts, which the coordinator refuses without a "
                "join token; set scheduler.join_token")
        if self.ca_bundle and not url.startswith("https://"):
            raise ProviderError(
                f"ec2 provider: coordinator_ca_file is set but the workers would reach the "
                f"coordinator at {url}, not https://; set coordinator_url to its https:// "
                "address")
        return url

    def _run_parameters(self, choice: _Choice, count: int, user_data: str) -> dict[str, Any]:
        options = self.options
        tags = [{"Key": POOL_TAG, "Value": options.pool},
                {"Key": MARKET_TAG, "Value": "spot" if choice.spot else "on-demand"},
                {"Key": "Name", "Value": f"rex-worker-{options.pool}"}]
        tags += [{"Key": k, "Value": v} for k, v in options.tags.items() if k != "Name"]
        parameters: dict[str, Any] = {
            "MinCount": 1, "MaxCount": count, "UserData": user_data,
            # Idempotent under botocore's retries of one call, fresh for each new call.
            "ClientToken": uuid.uuid4().hex,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
            # The worker shuts its instance down once drained: that must end the bill.
            "InstanceInitiatedShutdownBehavior": "terminate",
            # The drain watcher reads its tags from IMDSv2.
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "InstanceMetadataTags": "enabled"},
        }
        if options.launch_template:
            key = "LaunchTemplateId" if options.launch_template.startswith("lt-") else (
                "LaunchTemplateName")
            parameters["LaunchTemplate"] = {key: options.launch_template,
                                            "Version": options.launch_template_version}
        if options.image_id:
            parameters["ImageId"] = options.image_id
        if choice.instance_type:
            parameters["InstanceType"] = choice.instance_type
        if choice.subnet:
            parameters["SubnetId"] = choice.subnet
        if options.security_groups:
            parameters["SecurityGroupIds"] = list(options.security_groups)
        if options.key_name:
            parameters["KeyName"] = options.key_name
        if options.instance_profile:
            key = "Arn" if options.instance_profile.startswith("arn:") else "Name"
            parameters["IamInstanceProfile"] = {key: options.instance_profile}
        if choice.spot:
            parameters["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time",
                                "InstanceInterruptionBehavior": "terminate"}}
        return parameters

    async def create_workers(self, count: int, launch: WorkerLaunch) -> Sequence[ProvidedWorker]:
        if count <= 0:
            return []
        user_data = render_user_data(launch, self._coordinator_url(launch), self.options,
                                     self.ca_bundle)
        if len(user_data.encode()) > USER_DATA_LIMIT:
            raise ProviderError(self._too_large(user_data))
        client = await self._ec2()
        created: list[ProvidedWorker] = []
        refused: list[str] = []
        out_of_quota: set[tuple[bool, str | None]] = set()
        for choice in self._choices():
            if (choice.spot, choice.instance_type) in out_of_quota:
                continue
            while len(created) < count:
                parameters = self._run_parameters(choice, count - len(created), user_data)
                try:
                    response = await self._call(client.run_instances, **parameters)
                except Exception as exc:
                    code = error_code(exc)
                    if code in _CAPACITY_ERRORS or code in _QUOTA_ERRORS or (
                        choice.spot and code.startswith("Spot")
                    ):
                        refused.append(f"{choice}: {error_text(exc)}")
                        log.warning("ec2 provider: %s refused (%s); trying the next choice",
                                    choice, code)
                        if code in _QUOTA_ERRORS:
                            out_of_quota.add((choice.spot, choice.instance_type))
                        break
                    if created:  # keep what we have; the pool asks for the rest later
                        log.warning("ec2 provider: started %d of %d worker(s), then: %s",
                                    len(created), count, error_text(exc))
                        return created
                    raise self._fail(exc, f"starting {count} worker(s) ({choice})") from exc
                created += [ProvidedWorker(i["InstanceId"], ProvidedWorkerState.STARTING)
                            for i in response.get("Instances", ())]
            if len(created) >= count:
                break
        if not created:
            raise ProviderError(
                f"ec2 provider (pool {self.options.pool!r}) found no capacity for {count} "
                f"worker(s): {'; '.join(refused)}; the pool retries with backoff: add "
                "instance_types or subnets (other zones), or raise the account's quotas")
        return created

    # -- observing -----------------------------------------------------------------

    async def _instances(self) -> list[dict[str, Any]]:
        client = await self._ec2()

        def describe() -> list[dict[str, Any]]:
            pages = client.get_paginator("describe_instances").paginate(Filters=[
                {"Name": f"tag:{POOL_TAG}", "Values": [self.options.pool]},
                {"Name": "instance-state-name", "Values": _LIVE_STATES},
            ])
            return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

        try:
            return await self._call(describe)
        except Exception as exc:
            raise self._fail(exc, "listing its instances") from exc

    def _view(self, instance: dict[str, Any]) -> ProvidedWorker | None:
        """The worker an instance is, or None once it has exited after a drain."""
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", ())}
        state, worker_id = instance["State"]["Name"], instance["InstanceId"]
        drain = tags.get(DRAIN_TAG)
        if drain is not None:
            if state in ("stopping", "stopped"):
                return None  # drained and shut down: the pool terminates what is left
            try:
                started = float(drain)
            except ValueError:
                started = 0.0
            waited = self.clock() - started
            if waited > self.options.drain_timeout_s:
                return ProvidedWorker(worker_id, ProvidedWorkerState.FAILED,
                                      f"still draining after {waited:.0f} s (drain_timeout_s "
                                      f"= {self.options.drain_timeout_s:g})")
            return ProvidedWorker(worker_id, ProvidedWorkerState.DRAINING)
        if state in ("stopping", "stopped"):
            reason = instance.get("StateReason", {}).get("Message", "no reason given")
            return ProvidedWorker(worker_id, ProvidedWorkerState.FAILED,
                                  f"instance {state} without being drained: {reason}")
        live = ProvidedWorkerState.RUNNING if state == "running" else ProvidedWorkerState.STARTING
        return ProvidedWorker(worker_id, live)

    async def list_workers(self) -> Sequence[ProvidedWorker]:
        views = (self._view(i) for i in await self._instances())
        return [v for v in views if v is not None]

    # -- draining and terminating --------------------------------------------------

    async def drain(self, worker_id: str) -> None:
        client = await self._ec2()
        try:
            await self._call(client.create_tags, Resources=[worker_id],
                             Tags=[{"Key": DRAIN_TAG, "Value": f"{self.clock():.0f}"}])
        except Exception as exc:
            raise self._fail(exc, f"marking instance {worker_id} to drain") from exc

    async def terminate(self, worker_id: str) -> None:
        client = await self._ec2()
        try:
            await self._call(client.terminate_instances, InstanceIds=[worker_id])
        except Exception as exc:
            if error_code(exc) in _GONE:
                return  # already gone is what we wanted
            raise self._fail(exc, f"terminating instance {worker_id}") from exc

    async def close(self) -> None:
        """Drain every instance of the pool, wait up to ``drain_timeout_s`` for them to
        finish and shut down, then terminate whatever is left."""
        try:
            views = await self.list_workers()
            for view in views:
                if view.state is not ProvidedWorkerState.DRAINING:
                    await self.drain(view.worker_id)
            deadline = time.monotonic() + self.options.drain_timeout_s
            while views and time.monotonic() < deadline:
                await asyncio.sleep(min(self.options.drain_poll_s,
                                        max(0.0, deadline - time.monotonic())))
                views = await self.list_workers()
            if views:
                client = await self._ec2()
                ids = [v.worker_id for v in views]
                try:
                    await self._call(client.terminate_instances, InstanceIds=ids)
                except Exception as exc:
                    raise self._fail(exc, f"terminating instances {', '.join(ids)}") from exc
        finally:
            await self._call.close()
            if self._client is not None:
                await asyncio.to_thread(self._client.close)


def create_ec2_provider(options: Ec2ProviderOptions, context: ComponentContext) -> Ec2Provider:
    """The ``ec2`` descriptor's factory."""
    return Ec2Provider(options)
