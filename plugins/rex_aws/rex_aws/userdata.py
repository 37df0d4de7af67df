"""The user-data script an ``ec2`` worker instance boots with.

It runs once, as root, through cloud-init: the optional ``install_command``, then
``rexd worker`` with the instance id as worker id, and a watcher that sends the worker
SIGTERM (it drains) once the instance carries the ``rex:drain`` tag, read from the
instance metadata service (IMDSv2, instance tags enabled). When the worker exits, for a
drain or a crash, the instance shuts down, which terminates it. The join token travels in
the user-data (readable by whoever may call ``ec2:DescribeInstanceAttribute`` and from
inside the instance), never in tags, and reaches the worker by environment, not argv.
"""

from __future__ import annotations

import shlex

from rex_aws.options import Ec2ProviderOptions
from rexcore.providers.interface import WorkerLaunch

__all__ = ["render_user_data"]

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


def render_user_data(launch: WorkerLaunch, coordinator_url: str,
                     options: Ec2ProviderOptions) -> str:
    arguments = ["--slots", str(launch.slots), "--sandbox", launch.sandbox]
    for key, value in launch.properties:
        arguments += ["--property", f"{key}={value}"]
    return _TEMPLATE.format(
        pool=options.pool.replace("\n", " "),
        install=options.install_command or "# (no install_command: the image has rexd)",
        token=shlex.quote(launch.join_token),
        coordinator=shlex.quote(coordinator_url),
        arguments=" ".join(shlex.quote(a) for a in arguments),
        poll=options.drain_poll_s,
    )
