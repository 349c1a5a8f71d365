"""The package as released: version metadata, the wheel's contents, and the wheel installed into a fresh
virtual environment (CPU torch first, dependencies from the package registry under constraints.txt) running
`fedmarket --version` and a short real job from outside the repository.

The install test is skipped only when pip cannot reach the package registry; any other failure fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import fedmarket
from fedmarket.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
TORCH = "torch==2.13.0"  # the CPU wheel (Makefile, constraints.txt)

# pip's messages when the registry cannot be reached (no network, DNS, proxy, timeouts); "from versions:
# none" is what `pip -q` says when the index answered nothing for a package that exists (setuptools, numpy)
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Max retries exceeded|Could not fetch URL|"
    r"ConnectTimeoutError|ReadTimeoutError|ProxyError|Connection refused|Connection reset by peer|"
    r"\(from versions: none\)"
)


def test_version_is_the_distributions():
    assert fedmarket.__version__ == VERSION


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedmarket {VERSION}"


def test_license_and_changelog():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "the fedmarket authors" in text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{VERSION}]" in changelog, f"CHANGELOG.md has no entry for version {VERSION}"


def test_extras_used_by_the_code_are_declared():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in ("text", "flower", "privacy", "dev", "serve", "tracking", "docs"):
        assert name in extras, name
    assert not any(d.lower().startswith("torch") for d in PYPROJECT["project"]["dependencies"]), (
        "torch must stay out of the dependencies (an unpinned torch pulls a CUDA build)"
    )


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _pip_or_skip(proc: subprocess.CompletedProcess, what: str) -> None:
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and NETWORK_ERRORS.search(output):
        pytest.skip(
            f"{what}: pip cannot reach the package registry: {NETWORK_ERRORS.search(output).group(0)}"
        )
    assert proc.returncode == 0, f"{what} failed:\n{output[-6000:]}"


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        FEDMARKET_CACHE=str(tmp_path_factory.mktemp("cache")),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, clean_env) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)],
        dist,
        clean_env,
        600,
    )
    _pip_or_skip(proc, "pip wheel")
    (path,) = dist.glob("fedmarket-*.whl")
    return path


@pytest.mark.slow
def test_wheel_contents(wheel):
    assert wheel.name == f"fedmarket-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(f"fedmarket-{VERSION}.dist-info/METADATA").decode()
    assert f"fedmarket-{VERSION}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata
    for extra in ("serve", "tracking", "docs"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "Requires-Dist: torch" not in metadata
    assert "fedmarket/cli.py" in names and "fedmarket/methods/fedmm/__init__.py" in names
    # every non-Python file the source package holds is shipped too (package data read at run time)
    package = ROOT / "src" / "fedmarket"
    data = [
        p.relative_to(package.parent).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert not [d for d in data if d not in names], "package data missing from the wheel"


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(wheel, tmp_path, clean_env):
    started = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    # torch first, pinned to the CPU wheel, so that nothing can pull a CUDA build
    _pip_or_skip(_run([*pip, TORCH], tmp_path, clean_env, 900), f"pip install {TORCH}")
    _pip_or_skip(_run([*pip, str(wheel)], tmp_path, clean_env, 900), "pip install of the wheel")
    listed = _run([str(bin_dir / "python"), "-m", "pip", "list"], tmp_path, clean_env, 120).stdout
    assert "nvidia" not in listed.lower(), "CUDA packages were installed"
    installed = time.monotonic() - started

    work = tmp_path / "work"  # outside the repository: the installed package, not the source tree
    work.mkdir()
    fm = str(bin_dir / "fedmarket")
    where = _run(
        [str(bin_dir / "python"), "-c", "import fedmarket; print(fedmarket.__file__)"], work, clean_env, 120
    )
    assert where.returncode == 0 and str(venv) in where.stdout, where.stdout + where.stderr

    version = _run([fm, "--version"], work, clean_env, 120)
    assert version.returncode == 0 and version.stdout.strip() == f"fedmarket {VERSION}", version

    methods = _run([fm, "methods"], work, clean_env, 120)
    assert methods.returncode == 0 and "fedmm" in methods.stdout and "fecosr" in methods.stdout, methods

    config = {
        "name": "release_smoke",
        "dataset": {
            "name": "synthetic",
            "options": {"num_markets": 2, "users_per_market": 40, "items_per_market": 60},
        },
        "method": {"name": "fedavg"},
        "train": {"rounds": 2, "batch_size": 256},
        "eval": {"candidates": 9},
        "output_dir": "runs",
        "progress": False,
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    run = _run([fm, "run", "tiny.yaml"], work, clean_env, 600)
    assert run.returncode == 0, run.stdout + run.stderr
    (run_dir,) = (work / "runs").glob("release_smoke-*")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["per_market"]) == {"m0", "m1"}
    assert 0 < metrics["average"]["auc"] < 1
    assert metrics["communication"]["m0"]["up_bytes"] > 0
    print(f"\nwheel install {installed:.0f} s, whole test {time.monotonic() - started:.0f} s")
