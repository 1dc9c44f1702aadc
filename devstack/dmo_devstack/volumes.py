"""Pod volumes and service-account credentials for the process kubelet.

A kubelet mounts a pod's volumes before it starts the containers: a Secret's keys
become files, an emptyDir is an empty directory, and the projected service-account
volume (``kube-api-access-*``, added by the ServiceAccount admission plugin) holds a
bound token from the TokenRequest API, ``ca.crt`` and ``namespace``, mounted at
``/var/run/secrets/kubernetes.io/serviceaccount``. When a volume cannot be set up
(its Secret or ServiceAccount does not exist) the pod stays ``ContainerCreating``
and the kubelet reports a ``FailedMount`` Event and tries again.

Here every pod is a process sharing this machine's filesystem, so a mountPath such
as ``/etc/dask-memory-operator/webhook-certs`` cannot be a different directory per
pod, and writing under ``/etc`` or ``/var/run`` would clash between pods. What is
done instead:

- Each pod gets a directory ``<kubelet state>/pods/<pod uid>/`` laid out as a real
  kubelet's ``/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~<plugin>/<volume>``.
  Secret and ConfigMap volumes are written there as the kubelet's atomic writer does
  (the files are links into ``..data``, itself a link to a timestamped directory, so
  a reader never sees half an update); ``items`` (key to path, mode) and
  ``defaultMode`` are honoured; ``optional: true`` mounts an empty directory.
  emptyDir is an empty directory. hostPath is the host path itself.
- **Path rewriting** stands in for the mount: every occurrence of a container's
  mountPath (as a whole path prefix) in its command, args, env values and
  workingDir is replaced by the pod's directory for that volume (``subPath``
  appended). A process given ``--webhook-cert-dir /etc/x/certs`` gets the pod's
  copy of the Secret; a path the program has compiled in, or builds at run time
  from pieces, is not rewritten. A volume mounted at ``/tmp`` also sets ``TMPDIR``.
- Service-account credentials: a token requested through the TokenRequest API
  (``expirationSeconds`` 3607 and a ``boundObjectRef`` to the pod, what the kubelet
  asks for) with the kubelet's own client, written with ``namespace`` to
  ``volumes/kubernetes.io~projected/kube-api-access/`` and treated as mounted at
  ``/var/run/secrets/kubernetes.io/serviceaccount`` for the rewriting above. There
  is **no** ``ca.crt``: the emulated API is plain HTTP. The process also gets
  ``KUBECONFIG`` naming ``<pod dir>/kubeconfig`` (that server, that token, the pod's
  namespace): clients here find credentials through it (kr8s and kubernetes' client
  read it, kopf's ``login_with_kubeconfig``), since the standard path cannot be a
  per-pod mount and in-cluster configuration would speak HTTPS. The token is
  requested again at 80% of its lifetime, as the kubelet refreshes it.

Secret and ConfigMap changes reach the volumes of running pods as the kubelet's
watch sees them (``write_volume``; a real kubelet takes up to its sync period).

Approximated: the service-account volume is not in the Pod's spec (no ServiceAccount
admission plugin here: the kubelet reads ``automountServiceAccountToken`` of the
pod, else of its ServiceAccount, itself, and the volume is named ``kube-api-access``
without kube's random suffix); a pod of a ServiceAccount that does not exist, which
that admission plugin would refuse, is created and waits in ContainerCreating until
the TokenRequest succeeds; a Secret's ``stringData`` is read too (a real API server
folds it into ``data`` on write, the emulator keeps it); volumes are not read-only
(the processes run as the kubelet's user); ``readOnlyRootFilesystem`` is not
enforced; projected volumes other than the service-account one, downwardAPI, PVCs
and the rest are not supported (the pod fails with ``UnsupportedContainer``).
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Where a pod finds its service-account credentials in a real cluster.
SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
#: What the kubelet asks the TokenRequest API for (kubelet's token manager).
TOKEN_EXPIRATION_SECONDS = 3607
#: Name of the projected service-account volume (kube adds a random suffix).
SA_VOLUME = "kube-api-access"
#: Volume types set up here; others make the pod fail.
SUPPORTED = ("secret", "configMap", "emptyDir", "hostPath")


class MountError(Exception):
    """A volume could not be set up (yet): the kubelet's FailedMount."""

    def __init__(self, volume: str, detail: str):
        super().__init__(f'MountVolume.SetUp failed for volume "{volume}" : {detail}')


class UnsupportedVolume(Exception):
    """A volume type that cannot be had here."""


@dataclass
class PodVolumes:
    """The volumes of one pod, set up in its directory."""

    #: ``<kubelet state>/pods/<uid>``.
    root: Path
    #: (mountPath, directory here) for the container, longest mountPath first.
    mounts: list[tuple[str, str]] = field(default_factory=list)
    #: The pod's kubeconfig, when it has service-account credentials.
    kubeconfig: Path | None = None
    #: Loop time (time.monotonic) at which the token should be requested again.
    token_refresh_at: float | None = None
    #: Secret/ConfigMap volumes by (kind, name) -> their directories, to refresh.
    sources: dict[tuple[str, str], list[tuple[Path, Mapping[str, Any]]]] = field(default_factory=dict)

    def volume_dir(self, plugin: str, name: str) -> Path:
        return self.root / "volumes" / f"kubernetes.io~{plugin}" / name

    def env(self) -> dict[str, str]:
        """Variables the volumes give the process."""
        env: dict[str, str] = {}
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        for mount_path, local in self.mounts:
            if mount_path.rstrip("/") == "/tmp":
                env["TMPDIR"] = local
        return env

    def rewrite(self, text: str) -> str:
        """``text`` with every mountPath (as a whole path prefix) replaced by its
        directory here, in one pass (a replacement is not rewritten again), the longest
        mountPath first."""
        if not self.mounts:
            return text
        local = {m.rstrip("/") or "/": d for m, d in self.mounts}
        alternatives = "|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
        pattern = rf"(?<![\w.~-])({alternatives})(?=$|[/\s'\":;,=)\]}}])"
        return re.sub(pattern, lambda m: local[m.group(1)], text)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------
# Writing files as the kubelet's atomic writer does


def write_atomic(target: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    """Make ``target`` hold exactly ``files`` (relative path -> (data, mode)), switched
    in one rename of the ``..data`` link, as kubelet's AtomicWriter does."""
    target.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    new = target / stamp
    new.mkdir()
    for rel, (data, mode) in files.items():
        path = new / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    tmp_link = target / "..data_tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(stamp)
    old = os.readlink(target / "..data") if (target / "..data").is_symlink() else None
    os.replace(tmp_link, target / "..data")
    top = {rel.split("/", 1)[0] for rel in files}
    for name in top:
        link = target / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for entry in target.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in top:
            entry.unlink()
    if old is not None and old != stamp:
        shutil.rmtree(target / old, ignore_errors=True)


def projected_files(
    data: Mapping[str, bytes], volume_source: Mapping[str, Any], kind: str, name: str
) -> dict[str, tuple[bytes, int]]:
    """The files of a Secret/ConfigMap volume: every key, or the listed ``items``."""
    default_mode = int(volume_source.get("defaultMode", 0o644))
    items = volume_source.get("items")
    if not items:
        return {key: (value, default_mode) for key, value in data.items()}
    files = {}
    for item in items:
        if item["key"] not in data:
            if volume_source.get("optional"):
                continue
            raise KeyError(f'configmap references non-existent config key: {item["key"]}' if kind == "configmap"
                           else f'references non-existent secret key: {item["key"]}')
        files[item["path"]] = (data[item["key"]], int(item.get("mode", default_mode)))
    return files


def object_data(kind: str, obj: Mapping[str, Any]) -> dict[str, bytes]:
    """The keys of a Secret (base64 ``data``, ``stringData`` is the API's) or ConfigMap."""
    if kind == "secret":
        out = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        # A real API server moves stringData into data on write; the emulator keeps it.
        out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return out
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


# ---------------------------------------------------------------------------------
# Setting the volumes up through the API


async def _get(api: Any, namespace: str, url: str) -> tuple[int, dict[str, Any]]:
    async with api.call_api("GET", version="v1", namespace=namespace, url=url, raise_for_status=False) as resp:
        return resp.status_code, resp.json() if resp.content else {}


async def mount_volumes(api: Any, pod: Mapping[str, Any], root: Path, server: str, *,
                        credentials: bool = True) -> PodVolumes:
    """Set up the volumes the pod's first container mounts, and its service-account
    credentials; MountError when one cannot be had yet, UnsupportedVolume when never."""
    volumes = PodVolumes(root)
    namespace = pod["metadata"]["namespace"]
    declared = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    container = pod["spec"]["containers"][0]
    mounts: list[tuple[str, str]] = []
    for mount in container.get("volumeMounts") or []:
        volume = declared.get(mount["name"])
        if volume is None:
            raise UnsupportedVolume(f'volumeMount "{mount["name"]}" names no volume of the pod')
        local = await _mount_one(api, namespace, volume, volumes)
        if mount.get("subPath"):
            local = os.path.join(local, mount["subPath"])
        mounts.append((mount["mountPath"], local))
    if credentials and await _automount(api, pod):
        token_dir = await _service_account(api, pod, volumes, server)
        if not any(m.rstrip("/") == SA_MOUNT_PATH for m, _ in mounts):
            mounts.append((SA_MOUNT_PATH, str(token_dir)))
    volumes.mounts = sorted(mounts, key=lambda m: len(m[0]), reverse=True)
    return volumes


async def _mount_one(api: Any, namespace: str, volume: Mapping[str, Any], volumes: PodVolumes) -> str:
    name = volume["name"]
    if "emptyDir" in volume:
        path = volumes.volume_dir("empty-dir", name)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    if "hostPath" in volume:
        return volume["hostPath"]["path"]
    for key, kind, plugin, plural in (("secret", "secret", "secret", "secrets"),
                                      ("configMap", "configmap", "configmap", "configmaps")):
        if key in volume:
            source = volume[key]
            obj_name = source.get("secretName") if kind == "secret" else source.get("name")
            path = volumes.volume_dir(plugin, name)
            await write_source(api, namespace, kind, plural, obj_name, source, name, path)
            volumes.sources.setdefault((kind, obj_name), []).append((path, source))
            return str(path)
    types = sorted(set(volume) - {"name"})
    raise UnsupportedVolume(f'volume "{name}" of type {", ".join(types)} is not supported by the process kubelet '
                            f"(only {', '.join(SUPPORTED)})")


async def write_source(api: Any, namespace: str, kind: str, plural: str, obj_name: str,
                       source: Mapping[str, Any], volume: str, path: Path) -> None:
    """Fetch a Secret/ConfigMap and write its volume."""
    status, obj = await _get(api, namespace, f"{plural}/{obj_name}")
    if status == 404:
        if source.get("optional"):
            write_atomic(path, {})
            return
        raise MountError(volume, f'{kind} "{obj_name}" not found')
    if status >= 400:
        raise MountError(volume, f"failed to get {kind} {namespace}/{obj_name}: {obj.get('message', status)}")
    try:
        write_volume(kind, obj, source, path)
    except KeyError as exc:
        raise MountError(volume, exc.args[0]) from None


def write_volume(kind: str, obj: Mapping[str, Any], source: Mapping[str, Any], path: Path) -> None:
    """Write (or update) a Secret/ConfigMap volume from the object."""
    write_atomic(path, projected_files(object_data(kind, obj), source, kind, obj["metadata"]["name"]))


async def _automount(api: Any, pod: Mapping[str, Any]) -> bool:
    """automountServiceAccountToken of the pod, else of its ServiceAccount (default true)."""
    spec = pod["spec"]
    if spec.get("automountServiceAccountToken") is not None:
        return bool(spec["automountServiceAccountToken"])
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    status, obj = await _get(api, pod["metadata"]["namespace"], f"serviceaccounts/{sa}")
    if status == 200 and obj.get("automountServiceAccountToken") is False:
        return False
    return True  # a missing account fails in the TokenRequest, with the API's message


async def _service_account(api: Any, pod: Mapping[str, Any], volumes: PodVolumes, server: str) -> Path:
    meta, spec = pod["metadata"], pod["spec"]
    namespace = meta["namespace"]
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    token, expiration = await request_token(api, namespace, sa, meta["name"], meta["uid"])
    token_dir = volumes.volume_dir("projected", SA_VOLUME)
    write_atomic(token_dir, {"token": (token.encode(), 0o644), "namespace": (namespace.encode(), 0o644)})
    volumes.kubeconfig = volumes.root / "kubeconfig"
    write_kubeconfig(volumes.kubeconfig, server, token, namespace, f"system:serviceaccount:{namespace}:{sa}")
    volumes.token_refresh_at = time.monotonic() + 0.8 * expiration
    return token_dir


async def request_token(api: Any, namespace: str, sa: str, pod: str, uid: str) -> tuple[str, int]:
    """A bound token through the TokenRequest API, as the kubelet's token manager asks."""
    body = {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                 "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}},
    }
    async with api.call_api("POST", version="v1", namespace=namespace, url=f"serviceaccounts/{sa}/token",
                            json=body, raise_for_status=False) as resp:
        answer = resp.json() if resp.content else {}
        if resp.status_code >= 300:
            raise MountError(SA_VOLUME, f"failed to fetch token: {answer.get('message', resp.status_code)}")
    status = answer["status"]
    return status["token"], int(answer.get("spec", {}).get("expirationSeconds", TOKEN_EXPIRATION_SECONDS))


async def refresh_token(api: Any, pod: Mapping[str, Any], volumes: PodVolumes, server: str) -> None:
    """Request the token again and rewrite it and the kubeconfig."""
    await _service_account(api, pod, volumes, server)


def write_kubeconfig(path: Path, server: str, token: str, namespace: str, user: str) -> None:
    """A kubeconfig with one context: ``server``, the token, the pod's namespace."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "in-pod",
        "clusters": [{"name": "in-pod", "cluster": {"server": server}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "in-pod", "context": {"cluster": "in-pod", "user": user, "namespace": namespace}}],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.chmod(0o600)
    os.replace(tmp, path)


def service_env(server: str) -> dict[str, str]:
    """The ``kubernetes`` Service's variables a kubelet gives every container."""
    parts = urllib.parse.urlsplit(server)
    host, port = parts.hostname or "127.0.0.1", str(parts.port or (443 if parts.scheme == "https" else 80))
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
        f"KUBERNETES_PORT_{port}_TCP_PORT": port,
        f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
    }
