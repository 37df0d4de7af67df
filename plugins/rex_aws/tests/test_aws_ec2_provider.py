"""The ``ec2`` provider against moto's EC2 over HTTP, driven by the real pool manager:
scaling 0 -> 3 -> 1, draining before terminating, and capacity errors on a first choice
recovered by the next (errors injected on the wire by the conftest's AwsFaults)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aws_test_support import IMAGE_ID, MotoServer
from rex_aws.ec2 import DRAIN_TAG, POOL_TAG, Ec2Provider
from rex_aws.options import Ec2ProviderOptions

from rexcore.pool.config import PoolConfig
from rexcore.pool.pool import SchedulerLoad, WorkerPool
from rexcore.pool.scaling import PoolObservation, ScalingDecision
from rexcore.providers.interface import ProvidedWorkerState, ProviderError, WorkerLaunch

TOKEN = "join-s3cret"
LAUNCH = WorkerLaunch("http://10.0.0.5:8981", join_token=TOKEN, slots=2,
                      properties=(("os", "linux"),), sandbox="linux")
TYPES = ["c7i.large", "m7i.large"]


class Network:
    def __init__(self, aws: MotoServer) -> None:
        ec2 = aws.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        self.subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{n}.0/24",
                              AvailabilityZone=f"us-east-1{zone}")["Subnet"]["SubnetId"]
            for n, zone in ((1, "a"), (2, "b"))
        ]
        self.security_group = ec2.create_security_group(
            GroupName="rex-workers", Description="rex workers", VpcId=vpc)["GroupId"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def network(aws: MotoServer) -> Network:
    return Network(aws)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture
async def make_provider(aws: MotoServer, network: Network, clock: Clock
                        ) -> AsyncIterator[Any]:
    providers: list[Ec2Provider] = []

    def make(**overrides: Any) -> Ec2Provider:
        settings: dict[str, Any] = {
            "endpoint_url": aws.endpoint_url, "region": "us-east-1", "pool": "test",
            "image_id": IMAGE_ID, "instance_types": TYPES, "subnets": network.subnets,
            "security_groups": [network.security_group], "api_max_attempts": 1,
            "drain_timeout_s": 600.0, "tags": {"team": "build"}}
        provider = Ec2Provider(Ec2ProviderOptions(**(settings | overrides)), clock=clock)
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider._call.close()


def _instances(aws: MotoServer, *states: str) -> dict[str, dict[str, Any]]:
    filters = [{"Name": f"tag:{POOL_TAG}", "Values": ["test"]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    reservations = aws.client("ec2").describe_instances(Filters=filters)["Reservations"]
    return {i["InstanceId"]: i for r in reservations for i in r["Instances"]}


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", ())}


class ScriptedPolicy:
    def __init__(self, *sizes: int) -> None:
        self.sizes = list(sizes)

    def decide(self, observation: PoolObservation) -> ScalingDecision:
        return ScalingDecision(self.sizes.pop(0), "scripted")


class JoinedInstances:
    """The coordinator as the pool sees it: every running instance of the pool has joined
    (moto runs no OS, so no real ``rexd worker`` ever calls in) and is idle."""

    def __init__(self, aws: MotoServer) -> None:
        self.aws = aws
        self.joined: list[str] = []

    def update(self) -> None:
        self.joined = list(_instances(self.aws, "running"))

    def __call__(self) -> SchedulerLoad:
        return SchedulerLoad(queued=0, running=0, arrivals=0, completions=0, busy_s=0.0,
                             running_by_worker=dict.fromkeys(self.joined, 0))


async def test_pool_scales_ec2_workers_0_to_3_to_1_draining_before_terminating(
    aws: MotoServer, network: Network, make_provider: Any, clock: Clock
) -> None:
    first_subnet, second_subnet = network.subnets
    aws.faults.fail("RunInstances", "InsufficientInstanceCapacity", SubnetId=first_subnet,
                    InstanceType=TYPES[0])
    provider = make_provider()
    load = JoinedInstances(aws)
    pool = WorkerPool(
        PoolConfig(min_workers=0, max_workers=10, target_workers=0, enable_autoscale=True),
        provider, LAUNCH, policy=ScriptedPolicy(3, 3, 1, 1, 1), load=load, clock=clock)
    await pool.start(run=False)
    assert _instances(aws) == {}

    # 0 -> 3: no capacity for the first choice, so the next subnet (zone) gets all three.
    await pool.tick()
    runs = aws.faults.actions("RunInstances")
    calls = [(r["InstanceType"], r["SubnetId"], r.get("Failed")) for r in runs]
    # moto starts MinCount instances per call (EC2 as many as it can up to MaxCount), so
    # the provider asks the working choice again for the rest.
    assert calls[0] == (TYPES[0], first_subnet, "InsufficientInstanceCapacity")
    assert set(calls[1:]) == {(TYPES[0], second_subnet, None)}
    instances = _instances(aws, "pending", "running")
    assert len(instances) == 3
    assert {i["SubnetId"] for i in instances.values()} == {second_subnet}
    assert {i["InstanceType"] for i in instances.values()} == {TYPES[0]}
    assert all(_tags(i)["team"] == "build" for i in instances.values())
    load.update()
    await pool.tick()
    assert pool.statistics().idle == 3

    # 3 -> 1: two workers are told to drain (tagged); nothing is terminated yet.
    await pool.tick()
    draining = {i for i, instance in _instances(aws).items() if DRAIN_TAG in _tags(instance)}
    assert len(draining) == 2
    await pool.tick()  # still draining: the workers have not exited
    assert aws.faults.actions("TerminateInstances") == []
    assert set(_instances(aws, "running")) == set(instances)
    assert pool.statistics().draining == 2

    # Each drained worker exits and its user-data shuts the instance down (moto runs no
    # OS: StopInstances stands in for that `shutdown -h now`); only then does the pool
    # terminate them.
    aws.client("ec2").stop_instances(InstanceIds=sorted(draining))
    load.update()
    await pool.tick()
    terminated = {i for c in aws.faults.actions("TerminateInstances")
                  for k, i in c.items() if k.startswith("InstanceId.")}
    assert terminated == draining
    order = [(c["Action"], c.get("ResourceId.1") or c.get("InstanceId.1"))
             for c in aws.faults.actions("CreateTags", "TerminateInstances")]
    for worker_id in draining:
        assert order.index(("CreateTags", worker_id)) < order.index(
            ("TerminateInstances", worker_id))
    assert set(_instances(aws, "terminated")) == draining
    assert set(_instances(aws, "running")) == set(instances) - draining
    statistics = pool.statistics()
    assert (statistics.idle, statistics.draining, statistics.failed) == (1, 0, 0)


async def test_quota_error_skips_the_other_subnets_of_that_instance_type(
    aws: MotoServer, network: Network, make_provider: Any
) -> None:
    aws.faults.fail("RunInstances", "InstanceLimitExceeded", InstanceType=TYPES[0])
    created = await make_provider().create_workers(1, LAUNCH)
    calls = [(r["InstanceType"], r["SubnetId"], r.get("Failed"))
             for r in aws.faults.actions("RunInstances")]
    assert calls == [(TYPES[0], network.subnets[0], "InstanceLimitExceeded"),
                     (TYPES[1], network.subnets[0], None)]
    assert _instances(aws)[created[0].worker_id]["InstanceType"] == TYPES[1]


async def test_spot_without_capacity_falls_back_to_on_demand(
    aws: MotoServer, make_provider: Any
) -> None:
    aws.faults.fail("RunInstances", "InsufficientInstanceCapacity",
                    **{"InstanceMarketOptions.MarketType": "spot"})
    created = await make_provider(spot=True).create_workers(2, LAUNCH)
    runs = aws.faults.actions("RunInstances")
    spot = [r for r in runs if r.get("InstanceMarketOptions.MarketType") == "spot"]
    assert len(spot) == len(TYPES) * 2 and all(r.get("Failed") for r in spot)
    assert runs[:len(spot)] == spot  # every spot choice is tried before on-demand
    instances = _instances(aws)
    assert {_tags(instances[w.worker_id])["rex:market"] for w in created} == {"on-demand"}


async def test_spot_without_fallback_gives_up_naming_every_choice_tried(
    aws: MotoServer, make_provider: Any
) -> None:
    aws.faults.fail("RunInstances", "InsufficientInstanceCapacity")
    with pytest.raises(ProviderError) as caught:
        await make_provider(spot=True, spot_fallback=False).create_workers(1, LAUNCH)
    message = str(caught.value)
    assert message.count(" in subnet-") == len(TYPES) * 2  # every choice, each named
    assert "spot c7i.large in subnet-" in message and "instance_types or subnets" in message
    assert _instances(aws) == {}


async def test_throttled_create_is_retried_by_the_pool_after_its_backoff(
    aws: MotoServer, make_provider: Any, clock: Clock
) -> None:
    aws.faults.fail("RunInstances", "RequestLimitExceeded", times=1, status=503)
    pool = WorkerPool(
        PoolConfig(min_workers=0, max_workers=10, target_workers=0, enable_autoscale=True,
                   provider_backoff_s=5.0),
        make_provider(), LAUNCH, policy=ScriptedPolicy(2, 2, 2), load=JoinedInstances(aws),
        clock=clock)
    await pool.tick()
    statistics = pool.statistics()
    assert statistics.provider_errors == 1
    assert "RequestLimitExceeded" in statistics.last_provider_error
    clock.now += 1.0
    await pool.tick()  # still backing off: no new call
    assert len(aws.faults.actions("RunInstances")) == 1
    clock.now += 5.0
    await pool.tick()
    assert len(_instances(aws, "pending", "running")) == 2


async def test_worker_still_draining_after_the_timeout_is_failed_and_terminated(
    aws: MotoServer, make_provider: Any, clock: Clock
) -> None:
    provider = make_provider(drain_timeout_s=300.0)
    load = JoinedInstances(aws)
    pool = WorkerPool(
        PoolConfig(min_workers=0, max_workers=10, target_workers=0, enable_autoscale=True),
        provider, LAUNCH, policy=ScriptedPolicy(1, 0, 0, 0), load=load, clock=clock)
    await pool.tick()
    (worker_id,) = _instances(aws)
    load.update()
    await pool.tick()  # drains it
    clock.now += 299.0
    await pool.tick()
    assert aws.faults.actions("TerminateInstances") == []
    clock.now += 2.0
    assert [(w.worker_id, w.state) for w in await provider.list_workers()] == [
        (worker_id, ProvidedWorkerState.FAILED)]
    await pool.tick()
    assert set(_instances(aws, "terminated")) == {worker_id}


async def test_instance_stopped_without_a_drain_is_reported_failed(
    aws: MotoServer, make_provider: Any
) -> None:
    provider = make_provider()
    (worker,) = await provider.create_workers(1, LAUNCH)
    aws.client("ec2").stop_instances(InstanceIds=[worker.worker_id])
    (view,) = await provider.list_workers()
    assert view.state is ProvidedWorkerState.FAILED
    assert "without being drained" in view.reason


async def test_user_data_starts_the_worker_with_its_token_and_tags_never_carry_it(
    aws: MotoServer, make_provider: Any
) -> None:
    (worker,) = await make_provider().create_workers(1, LAUNCH)
    ec2 = aws.client("ec2")
    attribute = ec2.describe_instance_attribute(InstanceId=worker.worker_id,
                                                Attribute="userData")
    script = base64.b64decode(attribute["UserData"]["Value"]).decode()
    assert "export REX_JOIN_TOKEN=join-s3cret" in script
    assert ("rexd worker --coordinator http://10.0.0.5:8981 --worker-id \"$worker_id\" "
            "--slots 2 --sandbox linux --property os=linux") in script
    assert "tags/instance/rex:drain" in script and "shutdown -h now" in script
    instance = _instances(aws)[worker.worker_id]
    assert _tags(instance)[POOL_TAG] == "test"
    assert not any(TOKEN in f"{k}={v}" for k, v in _tags(instance).items())
    run = aws.faults.actions("RunInstances")[0]
    assert run["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert run["MetadataOptions.InstanceMetadataTags"] == "enabled"


@pytest.mark.parametrize(("launch", "overrides", "expected"), [
    (WorkerLaunch("http://127.0.0.1:8981", join_token=TOKEN), {}, "coordinator_url"),
    (WorkerLaunch("http://localhost:8981", join_token=TOKEN), {}, "coordinator_url"),
    (WorkerLaunch("http://10.0.0.5:8981"), {}, "scheduler.join_token"),
])
async def test_create_refuses_what_remote_workers_could_not_join(
    aws: MotoServer, make_provider: Any, launch: WorkerLaunch, overrides: dict[str, Any],
    expected: str
) -> None:
    with pytest.raises(ProviderError, match=expected):
        await make_provider(**overrides).create_workers(1, launch)
    assert aws.faults.actions("RunInstances") == []


async def test_coordinator_url_option_overrides_the_loopback_url_rexd_serves_on(
    aws: MotoServer, make_provider: Any
) -> None:
    provider = make_provider(coordinator_url="http://rex.internal:8981")
    await provider.create_workers(1, WorkerLaunch("http://127.0.0.1:8981", join_token=TOKEN))
    user_data = base64.b64decode(aws.faults.actions("RunInstances")[0]["UserData"]).decode()
    assert "--coordinator http://rex.internal:8981 " in user_data


async def test_launch_template_is_named_by_id_or_name(aws: MotoServer, make_provider: Any
                                                      ) -> None:
    template = aws.client("ec2").create_launch_template(
        LaunchTemplateName="rex-worker",
        LaunchTemplateData={"ImageId": IMAGE_ID, "InstanceType": "c7i.large"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    await make_provider(launch_template="rex-worker", image_id="", instance_types=[]
                        ).create_workers(1, LAUNCH)
    await make_provider(launch_template=template, image_id="", instance_types=[],
                        launch_template_version="1").create_workers(1, LAUNCH)
    first, second = aws.faults.actions("RunInstances")
    assert first["LaunchTemplate.LaunchTemplateName"] == "rex-worker"
    assert "InstanceType" not in first
    assert (second["LaunchTemplate.LaunchTemplateId"], second["LaunchTemplate.Version"]) == (
        template, "1")
    assert len(_instances(aws)) == 2


async def test_close_drains_every_worker_then_terminates_what_is_left(
    aws: MotoServer, make_provider: Any
) -> None:
    provider = make_provider(drain_timeout_s=0.0)
    created = await provider.create_workers(2, LAUNCH)
    await provider.close()
    tagged = {c["ResourceId.1"] for c in aws.faults.actions("CreateTags")}
    assert tagged == {w.worker_id for w in created}
    assert set(_instances(aws, "terminated")) == tagged


@pytest.mark.parametrize(("options", "expected"), [
    ({}, "`launch_template` or `image_id`"),
    ({"image_id": IMAGE_ID}, "`instance_types`"),
    ({"image_id": IMAGE_ID, "instance_types": TYPES, "tags": {"rex:pool": "x"}}, "rex:"),
])
def test_options_say_what_is_missing(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        Ec2ProviderOptions(**options)
