"""The plugin module of rex-aws: registers the ``ec2`` provider and the ``s3`` blob store.

Registration imports neither boto3 nor the components: the factories and probes do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rex_aws.options import Ec2ProviderOptions, S3StoreOptions
from rexcore import hookimpl
from rexcore.plugins.descriptors import (
    BlobStoreDescriptor,
    ComponentContext,
    ProbeResult,
    ProviderDescriptor,
)

__all__ = ["rexcore_blob_stores", "rexcore_providers"]


def _create_ec2(options: Ec2ProviderOptions, context: ComponentContext) -> Any:
    from rex_aws.ec2 import create_ec2_provider

    return create_ec2_provider(options, context)


def _create_s3(options: S3StoreOptions, context: ComponentContext) -> Any:
    from rex_aws.s3 import create_s3_store

    return create_s3_store(options, context)


def _probe_ec2() -> ProbeResult:
    from rex_aws._aws import probe_aws

    return probe_aws("ec2")


def _probe_s3() -> ProbeResult:
    from rex_aws._aws import probe_aws

    return probe_aws("s3")


@hookimpl
def rexcore_providers() -> Iterator[ProviderDescriptor]:
    yield ProviderDescriptor(
        name="ec2", factory=_create_ec2, options_type=Ec2ProviderOptions, probe=_probe_ec2,
        description="workers on EC2 instances (launch template or AMI; spot optional)",
    )


@hookimpl
def rexcore_blob_stores() -> Iterator[BlobStoreDescriptor]:
    yield BlobStoreDescriptor(
        name="s3", factory=_create_s3, options_type=S3StoreOptions, probe=_probe_s3,
        description="blobs in an S3 bucket, optionally behind a local disk cache",
    )
