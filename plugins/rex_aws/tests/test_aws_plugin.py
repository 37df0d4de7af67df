"""rex-aws as rexd sees it: `rexd plugins list` in a subprocess, with and without AWS
credentials and region, and the components built from config through the plugin manager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_test_support import IMAGE_ID, REGION, MotoServer

from rexcore.config.converter import structure_config
from rexcore.config.loader import resolve_config
from rexcore.config.model import RexConfig
from rexcore.plugins.descriptors import ComponentContext
from rexcore.plugins.manager import build_plugin_manager
from rexcore.testing import start_rexd

_NO_AWS = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_CONFIG_FILE": os.devnull}


def _plugins_list(tmp_path: Path, **aws: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "REXCORE_", "BOTO"))}
    env |= _NO_AWS | aws | {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "rexcore.cli.rexd", "plugins", "list",
                             "--json"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    row = {r["name"]: r for r in json.loads(result.stdout)}["rex-aws"]
    row["by_name"] = {(c["kind"], c["name"]): c for c in row["components"]}
    return row


def test_plugins_list_shows_ec2_and_s3_active_with_credentials_and_region(tmp_path):
    row = _plugins_list(tmp_path, AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
                        AWS_SECRET_ACCESS_KEY="secret", AWS_DEFAULT_REGION="eu-west-1")
    assert (row["distribution"], row["status"]) == ("rex-aws", "active")
    assert row["by_name"][("provider", "ec2")]["available"] is True
    assert row["by_name"][("blob_store", "s3")]["available"] is True


def test_plugins_list_says_why_without_credentials(tmp_path):
    row = _plugins_list(tmp_path, AWS_DEFAULT_REGION="eu-west-1")
    assert row["status"] == "unavailable"
    for component in row["by_name"].values():
        assert component["available"] is False
        assert "no AWS credentials found by the boto3 chain" in component["reason"]
    assert "ec2: no AWS credentials" in row["reason"]


def test_plugins_list_says_why_without_a_region(tmp_path):
    row = _plugins_list(tmp_path, AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
                        AWS_SECRET_ACCESS_KEY="secret")
    ec2 = row["by_name"][("provider", "ec2")]
    assert ec2["available"] is False
    assert "no AWS region" in ec2["reason"] and "`region` option" in ec2["reason"]


def test_ec2_options_from_config_are_checked_with_their_path():
    plugins = build_plugin_manager(None, strict=True)
    raw = {"pool": {"provider": {"name": "ec2", "options": {"instance_types": ["c7i.large"]}}}}
    with pytest.raises(Exception, match=r"pool.provider.options[\s\S]*launch_template"):
        resolve_config(structure_config(raw, RexConfig), plugins)


async def test_rexd_serves_blobs_from_an_s3_store_built_from_config(aws: MotoServer, tmp_path):
    import aiohttp

    aws.client("s3").create_bucket(Bucket="rexd-blobs")
    plugins = build_plugin_manager(None, strict=True)
    config = {"storage": {"blob_store": {"name": "s3", "options": {
        "bucket": "rexd-blobs", "endpoint_url": aws.endpoint_url, "region": REGION}}}}
    running = await start_rexd(plugins, tmp_path / "data", config)
    try:
        from rexcore.artifacts.digest import digest_of

        data = b"a blob that lands in S3"
        digest = digest_of(data)
        async with aiohttp.ClientSession() as session:
            url = f"{running.url}/v1/cas/{digest.function.value}/{digest.hash}/{digest.size}"
            async with session.put(url, data=data) as response:
                assert response.status < 300, await response.text()
            async with session.get(url) as response:
                assert await response.read() == data
        objects = aws.client("s3").list_objects_v2(Bucket="rexd-blobs")["Contents"]
        assert [o["Key"] for o in objects] == [f"rex/cas/blake3/{digest.hash}"]
    finally:
        await running.daemon.stop()


async def test_ec2_descriptor_builds_a_provider_from_config_options(tmp_path):
    from rex_aws.ec2 import Ec2Provider

    plugins = build_plugin_manager(None, strict=True)
    descriptor = plugins.component("provider", "ec2").descriptor
    options = structure_config({"image_id": IMAGE_ID, "instance_types": ["c7i.large"],
                                "subnets": ["subnet-1"], "drain_timeout_s": 60},
                               descriptor.options_type)
    provider = descriptor.factory(options, ComponentContext(data_dir=tmp_path))
    assert isinstance(provider, Ec2Provider)
    assert provider.options.drain_timeout_s == 60.0
    await provider._call.close()  # close() would list instances; none were made
