"""Options of ``ec2`` (``[pool.provider.options]``) and ``s3``
(``[storage.blob_store.options]``); every one is documented in docs/configuration.md."""

from __future__ import annotations

import attrs

from rexcore.config.types import ByteSize

__all__ = ["Ec2ProviderOptions", "S3StoreOptions"]

_MiB = 1 << 20
#: S3 refuses parts below 5 MiB (except the last one of an upload).
S3_MIN_PART_SIZE = 5 * _MiB


@attrs.frozen(kw_only=True)
class Ec2ProviderOptions:
    """Options of the ``ec2`` provider.

    What to launch: ``launch_template`` (an ``lt-...`` id or a name, at
    ``launch_template_version``) and/or ``image_id``; ``instance_types`` and ``subnets``
    are tried in order (every subnet of the first type, then the next type) when EC2 has
    no capacity or quota for a choice. Instances are tagged ``rex:pool = pool`` plus
    ``tags``; the provider only ever sees and touches instances of its pool.

    ``coordinator_ca_file`` is read when the provider is built (by
    :class:`~rex_aws.ec2.Ec2Provider`, not here: options hold no file contents); a CA only
    matters for an ``https://`` coordinator, so with one set a ``coordinator_url`` of any
    other form is refused here, at config time, rather than leaving every worker to fail
    (or, with ``http://``, to ignore the CA and talk in clear text).
    """

    region: str = ""
    endpoint_url: str = ""
    pool: str = attrs.field(default="default", validator=attrs.validators.min_len(1))
    launch_template: str = ""
    launch_template_version: str = "$Default"
    image_id: str = ""
    instance_types: list[str] = attrs.field(factory=list)
    subnets: list[str] = attrs.field(factory=list)
    security_groups: list[str] = attrs.field(factory=list)
    key_name: str = ""
    instance_profile: str = ""
    tags: dict[str, str] = attrs.field(factory=dict)
    spot: bool = False
    spot_fallback: bool = True
    #: The URL instances reach the coordinator at (default: the URL rexd serves on).
    coordinator_url: str = ""
    #: A PEM bundle on the coordinator's machine: the CA(s) that signed the native API's
    #: ``https://`` certificate. The user-data writes it on the instance and starts the
    #: worker with ``--ca-file`` pointing at it.
    coordinator_ca_file: str = ""
    #: Shell run by user-data before the worker starts (e.g. ``pip install rexcore``).
    install_command: str = ""
    drain_poll_s: int = attrs.field(default=15, validator=attrs.validators.ge(1))
    drain_timeout_s: float = attrs.field(default=3600.0, validator=attrs.validators.ge(0))
    api_max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        if not (self.launch_template or self.image_id):
            raise ValueError("the ec2 provider needs `launch_template` or `image_id` to "
                             "know what to launch; set one of them")
        if not (self.launch_template or self.instance_types):
            raise ValueError("the ec2 provider needs `instance_types` when no "
                             "`launch_template` gives one; set e.g. instance_types = "
                             "[\"c7i.xlarge\"]")
        if any(key.startswith("rex:") for key in self.tags):
            raise ValueError("`tags` must not use the `rex:` prefix: rex tags its instances "
                             "with it itself; rename the tag")
        if (self.coordinator_ca_file and self.coordinator_url
                and not self.coordinator_url.startswith("https://")):
            raise ValueError(f"`coordinator_ca_file` is set but `coordinator_url` "
                             f"{self.coordinator_url!r} is not https://, so workers would "
                             "never use the CA; give the coordinator's https:// URL (with "
                             "[protocols.native] tls_certificate) or drop coordinator_ca_file")


@attrs.frozen(kw_only=True)
class S3StoreOptions:
    """Options of the ``s3`` blob store.

    Blobs live at ``<prefix><function>/<hash>`` in ``bucket``. Blobs of at least
    ``multipart_threshold`` bytes go up as multipart uploads of ``part_size`` parts,
    ``concurrency`` requests at a time. With ``cache_dir`` a local ``disk`` store of at
    most ``cache_size`` bytes sits in front: reads are served from it, writes fill it.
    """

    bucket: str = attrs.field(validator=attrs.validators.min_len(1))
    prefix: str = "rex/cas/"
    region: str = ""
    endpoint_url: str = ""
    multipart_threshold: ByteSize = attrs.field(
        default=ByteSize(64 * _MiB), validator=attrs.validators.ge(ByteSize(S3_MIN_PART_SIZE)))
    part_size: ByteSize = attrs.field(
        default=ByteSize(16 * _MiB), validator=attrs.validators.ge(ByteSize(S3_MIN_PART_SIZE)))
    concurrency: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    cache_dir: str = ""
    cache_size: ByteSize = attrs.field(
        default=ByteSize(10 << 30), validator=attrs.validators.gt(ByteSize(0)))
    #: List the prefix when the store opens, so ``stats`` counts what the bucket holds.
    index_on_open: bool = True
    api_max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        if self.prefix and not self.prefix.endswith("/"):
            raise ValueError(f"`prefix` must end with '/', got {self.prefix!r}; "
                             f"write {self.prefix + '/'!r}")
