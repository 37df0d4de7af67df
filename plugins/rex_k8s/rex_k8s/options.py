"""Options of the ``kubernetes`` provider: where the cluster is and the worker pod template.

Every option is documented in ``docs/configuration.md`` (a test checks it); the prose on
why each exists is in ``docs/kubernetes.md``.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["KubernetesProviderOptions", "Toleration"]

_ge0 = attrs.validators.ge(0)
_POOL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")
#: A ConfigMap key, which becomes a file name in the pod.
_CONFIG_MAP_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


@attrs.frozen
class Toleration:
    """One entry of the pod's ``tolerations`` (the Kubernetes field names, snake_cased)."""

    key: str = ""
    operator: str = attrs.field(default="Equal",
                                validator=attrs.validators.in_(("Equal", "Exists")))
    value: str = ""
    effect: str = ""
    toleration_seconds: int | None = None

    def manifest(self) -> dict[str, object]:
        entry: dict[str, object] = {"operator": self.operator}
        for field, value in (("key", self.key), ("value", self.value), ("effect", self.effect),
                             ("tolerationSeconds", self.toleration_seconds)):
            if value not in ("", None):
                entry[field] = value
        return entry


@attrs.frozen
class KubernetesProviderOptions:
    """Options of the ``kubernetes`` provider (``[pool.provider.options]``)."""

    # -- where the cluster is ------------------------------------------------------------
    #: A kubeconfig file; empty: in-cluster config when rexd runs in a pod, else
    #: ``$KUBECONFIG`` or ``~/.kube/config``.
    kubeconfig: str = ""
    #: The kubeconfig context; empty: its current context.
    context: str = ""
    #: Where worker pods live; empty: the kubeconfig context's namespace, or the pod's own
    #: namespace in-cluster, else ``default``.
    namespace: str = ""
    #: Tells pods of two coordinators in one namespace apart (label ``rex.dev/pool``).
    pool: str = attrs.field(default="default")

    @pool.validator
    def _check_pool(self, _attribute: attrs.Attribute, value: str) -> None:
        if not _POOL_NAME.fullmatch(value):  # it goes into pod names and a label value
            raise ValueError(f"pool {value!r} must be 1-40 lowercase letters, digits or '-', "
                             "starting and ending with a letter or digit")

    # -- how workers reach the coordinator ------------------------------------------------
    #: The coordinator's native API as pods reach it (its Service); empty: the address
    #: rexd listens on, which must then not be loopback.
    coordinator_url: str = ""
    #: A Secret holding the join token; pods read it through ``secretKeyRef``.
    join_token_secret: str = ""
    join_token_secret_key: str = "token"
    #: A ConfigMap (in the pods' namespace) holding the CA bundle that signed the
    #: coordinator's ``https://`` certificate: public, so not a Secret. Mounted read-only
    #: and passed as ``rexd worker --ca-file``.
    coordinator_ca_config_map: str = ""
    coordinator_ca_key: str = attrs.field(default="ca.crt")

    @coordinator_ca_key.validator
    def _check_ca_key(self, _attribute: attrs.Attribute, value: str) -> None:
        if not _CONFIG_MAP_KEY.fullmatch(value) or value == "." or value.startswith(".."):
            raise ValueError(f"coordinator_ca_key {value!r} is not a ConfigMap key: use "
                             "letters, digits, '-', '_' or '.', such as \"ca.crt\"")

    # -- the worker pod template -----------------------------------------------------------
    image: str = ""
    image_pull_policy: str = ""
    #: How the image starts rexd; ``worker --coordinator ...`` is appended.
    command: list[str] = attrs.field(factory=lambda: ["rexd"])
    service_account: str = ""
    #: ``{requests = {cpu = "2", memory = "4Gi"}, limits = {...}}``
    resources: dict[str, dict[str, str]] = attrs.field(factory=dict)
    node_selector: dict[str, str] = attrs.field(factory=dict)
    tolerations: list[Toleration] = attrs.field(factory=list)
    labels: dict[str, str] = attrs.field(factory=dict)
    annotations: dict[str, str] = attrs.field(factory=dict)
    env: dict[str, str] = attrs.field(factory=dict)
    image_pull_secrets: list[str] = attrs.field(factory=list)

    # -- lifecycle ------------------------------------------------------------------------
    #: Seconds a draining worker gets to finish its actions after SIGTERM (the pod's
    #: ``terminationGracePeriodSeconds`` and the grace of the drain's delete).
    termination_grace_period_s: int = attrs.field(default=600, validator=_ge0)
    #: A pod Pending longer than this (unschedulable, image never pulled) is a failed worker.
    pending_timeout_s: float = attrs.field(default=300.0, validator=attrs.validators.ge(0.0))
    #: Seconds one Kubernetes API call may take.
    request_timeout_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))

    def __attrs_post_init__(self) -> None:
        # The CA only serves an https:// coordinator: with http:// workers would ignore it
        # and talk in clear text, which is a mistake, not a choice.
        if (self.coordinator_ca_config_map and self.coordinator_url
                and not self.coordinator_url.startswith("https://")):
            raise ValueError(f"coordinator_ca_config_map is set but coordinator_url "
                             f"{self.coordinator_url!r} is not https://, so workers would "
                             "never use the CA; give the coordinator's https:// URL (with "
                             "[protocols.native] tls_certificate) or drop "
                             "coordinator_ca_config_map")
