"""Kubernetes Secrets read from the API server at start-up, for launchers that cannot mount them.

xpk's `workload create` has no way to reference a Secret (its --env values are literals, and
--env-file copies values from the local environment into the manifest). So clm.launch xpk
puts only *references* in the manifest, `CLM_SECRET_REFS=HF_TOKEN=clm-secrets/hf-token,...`,
and the host wrapper fetches the values with the pod's service-account token. The pod's
service account needs `get` on that Secret (README: "Run on GKE with xpk").
The Helm chart mounts Secrets natively (env valueFrom.secretKeyRef) and does not use this.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

from clm.errors import UserError

REFS_ENV = "CLM_SECRET_REFS"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def parse_refs(text: str) -> dict[str, tuple[str, str]]:
    """'HF_TOKEN=clm-secrets/hf-token,...' -> {'HF_TOKEN': ('clm-secrets', 'hf-token')}."""
    refs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        env_name, _, ref = item.partition("=")
        secret, _, key = ref.partition("/")
        if not (env_name and secret and key):
            raise UserError(f"{REFS_ENV}: {item!r} is not ENV_NAME=SECRET/KEY")
        refs[env_name] = (secret, key)
    return refs


def format_refs(refs: dict[str, tuple[str, str]]) -> str:
    return ",".join(f"{env_name}={secret}/{key}" for env_name, (secret, key) in refs.items())


def in_cluster_api() -> tuple[str, str | None, str | None, str]:
    """(API server URL, bearer token, CA bundle, namespace) of the pod this runs in.

    CLM_KUBERNETES_API points elsewhere, e.g. `kubectl proxy`'s http://127.0.0.1:8001 on a
    TPU VM; CLM_SERVICE_ACCOUNT_DIR replaces the mounted service-account directory."""
    account_dir = os.environ.get("CLM_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT_DIR)
    api = os.environ.get("CLM_KUBERNETES_API")
    if not api:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise UserError(f"{REFS_ENV} is set but this is not a Kubernetes pod (no KUBERNETES_SERVICE_HOST): "
                            "set CLM_KUBERNETES_API (e.g. kubectl proxy's URL) or pass the secrets as environment variables")
        api = f"https://{host}:{port}"

    def read(name: str) -> str | None:
        path = os.path.join(account_dir, name)
        return open(path).read().strip() if os.path.exists(path) else None

    ca_file = os.path.join(account_dir, "ca.crt")
    return api, read("token"), ca_file if os.path.exists(ca_file) else None, read("namespace") or "default"


def fetch(refs: dict[str, tuple[str, str]], api: str, token: str | None, ca_file: str | None,
          namespace: str) -> dict[str, str]:
    """The values of the referenced Secret keys. A missing key or Secret is skipped with a
    warning (W&B logging is optional); no permission is a UserError naming the RBAC fix."""
    context = ssl.create_default_context(cafile=ca_file) if api.startswith("https") else None
    secrets: dict[str, dict] = {}
    values = {}
    for env_name, (secret, key) in refs.items():
        if secret not in secrets:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            request = urllib.request.Request(f"{api}/api/v1/namespaces/{namespace}/secrets/{secret}",
                                             headers=headers)
            try:
                with urllib.request.urlopen(request, context=context, timeout=30) as response:
                    secrets[secret] = json.load(response).get("data") or {}
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    secrets[secret] = {}
                elif e.code == 403:
                    raise UserError(f"{REFS_ENV}: this pod's service account may not read Secret "
                                    f"{namespace}/{secret}: grant it `get` (README: Run on GKE with xpk)")
                else:
                    raise
        if key in secrets[secret]:
            values[env_name] = base64.b64decode(secrets[secret][key]).decode()
        else:
            print(f"clm: {env_name} not set: no key {key!r} in Secret {namespace}/{secret}", file=sys.stderr)
    return values


def resolve_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the Secrets named in CLM_SECRET_REFS filled in (and the references removed)."""
    text = env.get(REFS_ENV)
    if not text:
        return env
    refs = {name: ref for name, ref in parse_refs(text).items() if name not in env}
    resolved = dict(env)
    del resolved[REFS_ENV]
    if refs:
        resolved.update(fetch(refs, *in_cluster_api()))
    return resolved
