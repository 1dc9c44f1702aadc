"""A regular (non-editable) install works: wheels built from a copy of the source in a
temporary directory, installed into a fresh virtualenv. The operator's wheel finds the
MemoryPolicy CRD and the examples inside the installed package, not in a checkout,
and carries nothing of the dev stack; the dev stack's wheel, installed beside it,
finds them through the operator's package and its DNS shim in its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import amm_core

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, sys
from pathlib import Path
import amm_core, dask_memory_operator
from dask_memory_operator import manifests
print(json.dumps({
    "package": dask_memory_operator.__file__,
    "crd": manifests.MEMORYPOLICY_CRD.read_text(),
    "examples": sorted(p.name for p in Path(str(manifests.EXAMPLES)).iterdir()),
    "digest": amm_core.source_digest(),
}))
"""

CHECK_DEVSTACK = """
import json
from dmo_devstack import dns, sandbox, stack
print(json.dumps({
    "package": stack.__file__,
    "stack_crds": sorted(p.name for p in stack.PROJECT_CRDS.iterdir()),
    "sandbox_examples": str(sandbox.EXAMPLES),
    "dns_shim": (dns.SITECUSTOMIZE_DIR / "sitecustomize.py").is_file(),
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
    for project in (source, source / "devstack"):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "-w", str(wheels), str(project)], check=True, cwd=tmp_path, env=env)
    [wheel] = wheels.glob("dask_memory_operator-*.whl")
    [devstack_wheel] = wheels.glob("dask_memory_operator_devstack-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if "devstack" in n]  # not in the product

    # A fresh venv; the dependencies come from this one's site-packages as a plain
    # path (its editable installs of this project are not active there).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def pip_install(path: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                        "--no-index", str(path)], check=True, cwd=tmp_path, env=env)

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)

    pip_install(wheel)
    out = run(str(python), "-c", CHECK)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["package"].startswith(purelib)
    assert "kind: CustomResourceDefinition" in found["crd"] and "memorypolicies.amm.dask.org" in found["crd"]
    assert found["examples"] == ["adaptive.yaml", "daskcluster.yaml", "memorypolicy.yaml"]
    assert found["digest"] == amm_core.source_digest()  # the same code as this checkout

    cli = run(str(venv / "bin" / "dask-memory-operator"), "run", "--help")
    assert cli.returncode == 0 and "--scheduler-access" in cli.stdout
    # without the dev stack the sandbox says where it is, in one line
    sandbox = run(str(venv / "bin" / "dask-memory-operator"), "sandbox")
    assert sandbox.returncode == 2 and "pip install -e . -e ./devstack" in sandbox.stderr
    assert "Traceback" not in sandbox.stderr

    pip_install(devstack_wheel)
    out = run(str(python), "-c", CHECK_DEVSTACK)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["package"].startswith(purelib)
    assert found["stack_crds"] == ["memorypolicy.yaml"]
    assert found["sandbox_examples"].startswith(purelib)
    assert found["dns_shim"] is True
