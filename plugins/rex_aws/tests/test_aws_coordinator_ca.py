"""``coordinator_ca_file`` of the ``ec2`` provider: the CA bundle of a coordinator served
over https:// reaches the instances in their user-data (read back from moto, and the part
that writes it run with bash), and files or options that could not work are refused when
the provider is built, naming the option."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import rex_aws.userdata
from aws_test_support import IMAGE_ID, MotoServer
from rex_aws.ec2 import Ec2OptionsError, Ec2Provider
from rex_aws.options import Ec2ProviderOptions
from rex_aws.userdata import USER_DATA_LIMIT, render_user_data

from rexcore.config.converter import ConfigError, structure_config
from rexcore.providers.interface import ProviderError, WorkerLaunch
from tests._certificates import Certificates, make_certificates

URL = "https://rex.internal:8981"
LAUNCH = WorkerLaunch("http://127.0.0.1:8981", join_token="join-s3cret", slots=2,
                      sandbox="linux")
#: What `openssl x509 -text` puts before a certificate, plus what a shell would expand and
#: the heredoc's own delimiter: none of it may change on the way to the instance.
PREAMBLE = ("Subject: CN = rex test ca, O = $HOME `id` $(id) ${USER:-x} \\ \" '\n"
            "REX_COORDINATOR_CA\n")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def ca_file(certificates: Certificates, tmp_path: Path) -> Path:
    """A bundle of two CAs with text around them, as `cat` of real files often makes."""
    path = tmp_path / "coordinator ca.pem"
    path.write_text(PREAMBLE + certificates.ca.read_text()
                    + certificates.rogue_cert.read_text())
    return path


@pytest_asyncio.fixture
async def make_provider(aws: MotoServer) -> AsyncIterator[Any]:
    providers: list[Ec2Provider] = []

    def make(**overrides: Any) -> Ec2Provider:
        settings: dict[str, Any] = {
            "endpoint_url": aws.endpoint_url, "region": "us-east-1", "pool": "test",
            "image_id": IMAGE_ID, "instance_types": ["c7i.large"], "api_max_attempts": 1,
            "coordinator_url": URL}
        provider = Ec2Provider(Ec2ProviderOptions(**(settings | overrides)))
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider._call.close()


def _user_data(aws: MotoServer, instance_id: str) -> str:
    attribute = aws.client("ec2").describe_instance_attribute(InstanceId=instance_id,
                                                              Attribute="userData")
    return base64.b64decode(attribute["UserData"]["Value"]).decode()


async def test_instances_get_the_ca_bundle_and_the_worker_its_ca_file(
    aws: MotoServer, make_provider: Any, ca_file: Path
) -> None:
    (worker,) = await make_provider(coordinator_ca_file=str(ca_file)).create_workers(1, LAUNCH)
    script = _user_data(aws, worker.worker_id)
    assert ca_file.read_text() in script
    assert (f"rexd worker --coordinator {URL} --worker-id \"$worker_id\" --ca-file "
            "/etc/rex/coordinator-ca.pem --slots 2 --sandbox linux") in script
    # Written before install_command runs (which may need the CA too) and the worker starts.
    assert script.index("/etc/rex/coordinator-ca.pem") < script.index("rexd worker")


async def test_without_a_ca_file_the_user_data_has_no_ca(
    aws: MotoServer, make_provider: Any
) -> None:
    (worker,) = await make_provider().create_workers(1, LAUNCH)
    script = _user_data(aws, worker.worker_id)
    assert "--ca-file" not in script and "BEGIN CERTIFICATE" not in script
    assert "/etc/rex" not in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
async def test_user_data_writes_the_ca_bundle_byte_for_byte_readable_by_all(
    aws: MotoServer, make_provider: Any, ca_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "etc rex" / "coordinator-ca.pem"
    monkeypatch.setattr(rex_aws.userdata, "CA_FILE_PATH", str(target))
    (worker,) = await make_provider(coordinator_ca_file=str(ca_file)).create_workers(1, LAUNCH)
    lines = _user_data(aws, worker.worker_id).splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("mkdir -p "))
    end = next(i for i, line in enumerate(lines) if line.startswith("chmod 0644 "))
    section = "".join(lines[start:end + 1])
    # As cloud-init would run it, but with a umask that a missing chmod would show.
    await asyncio.to_thread(subprocess.run, ["bash", "-c", "set -u\numask 077\n" + section],
                            cwd=tmp_path, check=True,
                            env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"})
    assert target.read_bytes() == ca_file.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert f"--ca-file '{target}'" in "".join(lines)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot be read"),
    (b"", "holds no PEM certificate"),
    (b"just some notes about our CA\n", "holds no PEM certificate"),
    (b"\x30\x82\x01\x0a\x02\x82\x01\x01\x00\xff\xfe", "holds no PEM certificate"),  # DER
    (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
     "is not a bundle of certificates"),
])
def test_unusable_ca_file_is_refused_naming_the_option_and_the_path(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    options = Ec2ProviderOptions(image_id=IMAGE_ID, instance_types=["c7i.large"],
                                 coordinator_url=URL, coordinator_ca_file=str(path))
    with pytest.raises(ValueError) as caught:
        Ec2Provider(options)
    message = str(caught.value)
    assert f"coordinator_ca_file {str(path)!r} {problem}" in message
    assert "\n" not in message
    # rexd reports a provider factory's ProviderError in one line, without a traceback.
    assert isinstance(caught.value, ProviderError)


def test_ca_file_holding_a_private_key_is_refused(certificates: Certificates,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "server-with-key.pem"
    path.write_text(certificates.ca.read_text() + certificates.server_key.read_text())
    options = Ec2ProviderOptions(image_id=IMAGE_ID, instance_types=["c7i.large"],
                                 coordinator_url=URL, coordinator_ca_file=str(path))
    with pytest.raises(Ec2OptionsError, match="holds a private key"):
        Ec2Provider(options)


def test_ca_file_over_16_kib_is_refused(certificates: Certificates, tmp_path: Path) -> None:
    path = tmp_path / "everything.pem"
    certificate = certificates.ca.read_text()
    path.write_text(certificate * (USER_DATA_LIMIT // len(certificate) + 1))
    options = Ec2ProviderOptions(image_id=IMAGE_ID, instance_types=["c7i.large"],
                                 coordinator_url=URL, coordinator_ca_file=str(path))
    with pytest.raises(ValueError, match=f"coordinator_ca_file .* is over {USER_DATA_LIMIT} "
                                         "bytes"):
        Ec2Provider(options)


def test_user_data_over_16_kib_is_refused_when_the_provider_is_built(ca_file: Path) -> None:
    options = Ec2ProviderOptions(image_id=IMAGE_ID, instance_types=["c7i.large"],
                                 coordinator_url=URL, coordinator_ca_file=str(ca_file),
                                 install_command="true " + "x" * (USER_DATA_LIMIT - 1000))
    assert ca_file.stat().st_size > 1000  # neither alone is too large: together they are
    with pytest.raises(ValueError, match=f"user-data is [0-9]+ bytes, over EC2's limit of "
                                         f"{USER_DATA_LIMIT}; shorten install_command"):
        Ec2Provider(options)


async def test_launch_whose_user_data_would_pass_16_kib_is_refused_before_any_instance(
    aws: MotoServer, make_provider: Any, ca_file: Path
) -> None:
    # Options that render to 200 bytes under the limit: a launch with small values fits,
    # one whose properties add more than 200 bytes does not.
    probe = Ec2ProviderOptions(image_id=IMAGE_ID, instance_types=["c7i.large"],
                               coordinator_url=URL, coordinator_ca_file=str(ca_file))
    base = len(render_user_data(WorkerLaunch(URL), URL, probe, ca_file.read_text()).encode())
    provider = make_provider(coordinator_ca_file=str(ca_file),
                             install_command="true " + "x" * (USER_DATA_LIMIT - 200 - base))
    (worker,) = await provider.create_workers(1, LAUNCH)
    assert len(_user_data(aws, worker.worker_id).encode()) <= USER_DATA_LIMIT
    runs = len(aws.faults.actions("RunInstances"))
    large = WorkerLaunch(URL, join_token="t", properties=(("notes", "y" * 300),))
    with pytest.raises(ProviderError, match=f"over EC2's limit of {USER_DATA_LIMIT}"):
        await provider.create_workers(1, large)
    assert len(aws.faults.actions("RunInstances")) == runs


@pytest.mark.parametrize("url", ["http://10.0.0.5:8981", "srv:_rex._tcp.example.com",
                                 "10.0.0.5:8981"])
def test_ca_file_with_a_coordinator_url_that_is_not_https_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        structure_config({"image_id": IMAGE_ID, "instance_types": ["c7i.large"],
                          "coordinator_url": url, "coordinator_ca_file": "/etc/ca.pem"},
                         Ec2ProviderOptions, path="$.pool.provider.options")
    assert "`coordinator_ca_file` is set but `coordinator_url`" in "\n".join(
        caught.value.problems)


async def test_ca_file_without_coordinator_url_refuses_a_launch_url_that_is_not_https(
    aws: MotoServer, make_provider: Any, ca_file: Path
) -> None:
    provider = make_provider(coordinator_url="", coordinator_ca_file=str(ca_file))
    with pytest.raises(ProviderError, match="coordinator_ca_file is set .* not https://"):
        await provider.create_workers(1, WorkerLaunch("http://10.0.0.5:8981", join_token="t"))
    assert aws.faults.actions("RunInstances") == []
