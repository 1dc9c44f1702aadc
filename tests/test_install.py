"""A regular (non-editable) install works: a wheel built from a copy of the source in
a temporary directory, installed into a fresh virtualenv, finds the MemoryPolicy
CRD, the examples and the DNS shim inside the installed package, not in a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import amm_core

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, sys
from pathlib import Path
import amm_core, dask_memory_operator
from dask_memory_operator import manifests
from dask_memory_operator.devstack import dns, sandbox, stack
print(json.dumps({
    "package": dask_memory_operator.__file__,
    "crd": manifests.MEMORYPOLICY_CRD.read_text(),
    "examples": sorted(p.name for p in Path(str(manifests.EXAMPLES)).iterdir()),
    "stack_crds": sorted(p.name for p in stack.PROJECT_CRDS.iterdir()),
    "sandbox_examples": str(sandbox.EXAMPLES),
    "dns_shim": (dns.SITECUSTOMIZE_DIR / "sitecustomize.py").is_file(),
    "digest": amm_core.source_digest(),
}))
"""


def _copy_source(dest: Path) -> Path:
    """The files git tracks (links kept as links), without build leftovers."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
    return dest


def test_a_wheel_install_finds_the_crd_and_examples_in_the_package(tmp_path: Path):
    source = _copy_source(tmp_path / "src")
    # nothing of this checkout on the path (its metadata would tell pip the package
    # is installed already)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "-w", str(wheels), str(source)], check=True, cwd=tmp_path, env=env)
    [wheel] = wheels.glob("dask_memory_operator-*.whl")

    # A fresh venv; the dependencies come from this one's site-packages as a plain
    # path (its editable install of this project is not active there).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, cwd=tmp_path, env=env)
    out = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["package"].startswith(purelib)
    assert "kind: CustomResourceDefinition" in found["crd"] and "memorypolicies.amm.dask.org" in found["crd"]
    assert found["examples"] == ["adaptive.yaml", "daskcluster.yaml", "memorypolicy.yaml"]
    assert found["stack_crds"] == ["memorypolicy.yaml"]
    assert found["sandbox_examples"].startswith(purelib)
    assert found["dns_shim"] is True
    assert found["digest"] == amm_core.source_digest()  # the same code as this checkout

    cli = subprocess.run([str(venv / "bin" / "dask-memory-operator"), "run", "--help"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert cli.returncode == 0 and "--scheduler-access" in cli.stdout
