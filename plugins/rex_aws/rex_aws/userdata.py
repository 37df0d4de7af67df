"""The user-data script an ``ec2`` worker instance boots with.

It runs once, as root, through cloud-init: the optional ``install_command``, then
``rexd worker`` with the instance id as worker id, and a watcher that sends the worker
SIGTERM (it drains) once the instance carries the ``rex:drain`` tag, read from the
instance metadata service (IMDSv2, instance tags enabled). When the worker exits, for a
drain or a crash, the instance shuts down, which terminates it. The join token travels in
the user-data (readable by whoever may call ``ec2:DescribeInstanceAttribute`` and from
inside the instance), never in tags, and reaches the worker by environment, not argv.

With ``coordinator_ca_file`` the CA bundle travels in the user-data too (it is public): a
quoted heredoc writes it, byte for byte, to :data:`CA_FILE_PATH` (mode 0644) before
``install_command`` runs, and the worker gets ``--ca-file`` pointing at it. EC2 takes at
most :data:`USER_DATA_LIMIT` bytes of user-data; the provider checks the rendered size.
"""

from __future__ import annotations

import posixpath
import shlex

from rex_aws.options import Ec2ProviderOptions
from rexcore.providers.interface import WorkerLaunch

__all__ = ["CA_FILE_PATH", "USER_DATA_LIMIT", "render_user_data"]

#: Where the user-data writes the coordinator's CA bundle on the instance.
CA_FILE_PATH = "/etc/rex/coordinator-ca.pem"
#: EC2's limit on user-data, counted before base64.
USER_DATA_LIMIT = 16 * 1024

_TEMPLATE = """\
#!/bin/bash
# rex worker bootstrap, written by rex-aws's ec2 provider (pool {pool})
set -u
imds() {{
  local token
  token=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \\
    http://169.254.169.254/latest/api/token) || return 1
  curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}}
{ca}
{install}
export REX_JOIN_TOKEN={token}
worker_id=$(imds instance-id)
rexd worker --coordinator {coordinator} --worker-id "$worker_id" {arguments} &
worker=$!
while kill -0 "$worker" 2>/dev/null; do
  if imds tags/instance/rex:drain >/dev/null; then
    kill -TERM "$worker"  # the worker drains: running actions finish, no new ones start
    break
  fi
  sleep {poll}
done
wait "$worker"
shutdown -h now
"""


def _ca_section(ca_bundle: str, path: str) -> str:
    """Shell that writes ``ca_bundle`` to ``path`` as is: the heredoc's delimiter is
    quoted (no expansion) and occurs nowhere in the bundle (it cannot end it early)."""
    delimiter = "REX_COORDINATOR_CA"
    while delimiter in ca_bundle:
        delimiter += "_"
    body = ca_bundle if ca_bundle.endswith("\n") else ca_bundle + "\n"
    quoted = shlex.quote(path)
    return (f"mkdir -p {shlex.quote(posixpath.dirname(path) or '.')}\n"
            f"cat > {quoted} <<'{delimiter}'\n{body}{delimiter}\n"
            f"chmod 0644 {quoted}")


def render_user_data(launch: WorkerLaunch, coordinator_url: str,
                     options: Ec2ProviderOptions, ca_bundle: str = "") -> str:
    """The script; ``ca_bundle``: the PEM text of ``coordinator_ca_file`` (the provider
    reads it once), written to :data:`CA_FILE_PATH` and passed as ``--ca-file``."""
    arguments = ["--slots", str(launch.slots), "--sandbox", launch.sandbox]
    if ca_bundle:
        arguments = ["--ca-file", CA_FILE_PATH, *arguments]
    for key, value in launch.properties:
        arguments += ["--property", f"{key}={value}"]
    return _TEMPLATE.format(
        pool=options.pool.replace("\n", " "),
        ca=(_ca_section(ca_bundle, CA_FILE_PATH) if ca_bundle
            else "# (no coordinator_ca_file: the system's CAs verify the coordinator)"),
        install=options.install_command or "# (no install_command: the image has rexd)",
        token=shlex.quote(launch.join_token),
        coordinator=shlex.quote(coordinator_url),
        arguments=" ".join(shlex.quote(a) for a in arguments),
        poll=options.drain_poll_s,
    )
