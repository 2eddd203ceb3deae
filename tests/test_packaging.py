"""The package as a user installs it: a wheel built from pyproject.toml, installed into a fresh virtualenv, gives a
``pkictl`` command whose ``--help`` works. The wheel's dependencies are not downloaded here: the fresh venv borrows
the project venv's site-packages for them (PYTHONPATH), so what is tested is the package itself (its modules,
subpackages and console script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args], check=True,
                   cwd=ROOT, capture_output=True)


def test_a_wheel_installed_into_a_fresh_venv_gives_a_pkictl_command(tmp_path):
    # built from a copy: setuptools builds in the source tree (build/), which must not be this checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "node_modules", ".pki-local", "__pycache__", "*.egg-info", "build", ".pytest_cache",
        ".hypothesis"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(source))
    (wheel,) = (tmp_path / "dist").glob("iot_pki-*.whl")
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    _pip("--python", str(fresh / "bin" / "python"), "install", "--no-deps", str(wheel))
    pkictl = fresh / "bin" / "pkictl"
    assert pkictl.exists()
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}  # the dependencies only, not the checkout
    done = subprocess.run([str(pkictl), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: pkictl" in done.stdout
    for command in ("root", "customer", "device", "send", "local"):  # subcommands come from pkictl.commands
        assert command in done.stdout
    script = "import pkictl.cli, handlers.records, function_app; print(pkictl.cli.__file__)"
    imported = subprocess.run([str(fresh / "bin" / "python"), "-c", script], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(fresh)), "the installed package, not the checkout"
