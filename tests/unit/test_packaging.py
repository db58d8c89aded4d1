"""minivmm as a user gets it: a wheel, installed without make (no KVM needed)."""
import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import minivmm
from minivmm import payload as P
from tests.conftest import PAYLOADS, ROOT

SHIPPED = Path("share", "minivmm", "guest_payloads")


@pytest.mark.parametrize("site, data", [
    ("venv/lib/python3.11/site-packages", "venv"),              # a venv, --prefix DIR
    ("home/.local/lib/python3.11/site-packages", "home/.local"),  # pip install --user
    ("usr/local/lib/python3.11/dist-packages", "usr/local"),     # Debian's system pip
    ("target", "target"),                                       # pip install --target DIR
])
def test_an_install_finds_its_payloads_wherever_pip_put_them(tmp_path, site, data):
    # they used to be looked for under sys.prefix only: `minivmm run hello_long` after
    # `pip install --user minivmm` said "payload file not found"
    (tmp_path / site / "minivmm").mkdir(parents=True)
    (tmp_path / data / SHIPPED).mkdir(parents=True)
    assert P._shipped_payload_dir(tmp_path / site / "minivmm") == tmp_path / data / SHIPPED


def test_a_checkout_finds_its_own_payloads():
    assert P._shipped_payload_dir(ROOT / "minivmm") == ROOT / "guest_payloads"


BACKEND = "setuptools>=77"      # pyproject.toml's [build-system] requires


def _offline_build() -> list:
    """Build with this venv's setuptools (the `test` extra installs it) and no index: an
    isolated build fetched setuptools from PyPI on every run, so `make test` failed offline
    after a complete set-up. Without it here, the isolated build (and the network) it is."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return []
    return ["--no-build-isolation", "--no-index"] if major >= 77 else []


def test_the_test_extra_carries_the_build_backend():
    text = (ROOT / "pyproject.toml").read_text()
    requires = re.search(r'^\[build-system\]\nrequires = \[(.*?)\]', text, re.M)
    test_extra = re.search(r'^test = \[(.*?)\]', text, re.M)
    assert requires and test_extra
    assert f'"{BACKEND}"' == requires.group(1).strip()
    assert f'"{BACKEND}"' in test_extra.group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from a copy of the sources (the checkout is left untouched)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("minivmm", "guest_payloads"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--disable-pip-version-check", *_offline_build(),
                           "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [whl] = out.glob("minivmm-*.whl")
    return whl


def test_the_wheel_holds_every_module_and_payload_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = f"minivmm-{minivmm.__version__}.data/data/{SHIPPED.as_posix()}/"
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "minivmm").rglob("*.py")}
    payloads = {data + p.name for p in PAYLOADS.glob("*.asm")}
    info = {n for n in names if n.startswith(f"minivmm-{minivmm.__version__}.dist-info/")}
    assert modules and payloads and info
    assert names - info == modules | payloads
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(
        f"minivmm-{minivmm.__version__}.dist-info/METADATA"))
    assert meta["Name"] == "minivmm" and meta["Version"] == minivmm.__version__
    assert {"numpy>=1.24", "capstone>=5.0.2", "keystone-engine>=0.9.2",
            "ioctl-opt>=1.3"} <= set(meta.get_all("Requires-Dist"))


def test_an_installed_wheel_finds_a_shipped_payload_by_name(wheel, tmp_path):
    # --prefix lays out files as --user and Debian's pip do, away from sys.prefix
    dest = tmp_path / "dest"
    # --ignore-installed: else pip uninstalls the checkout's own (editable) minivmm first
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--disable-pip-version-check", "--no-warn-script-location",
                           "--ignore-installed", "--prefix", str(dest), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [site] = dest.glob("lib/python*/site-packages")
    env = {k: v for k, v in os.environ.items() if k != "MINIVMM_PAYLOADS"}
    env["PYTHONPATH"] = str(site)    # ahead of the checkout's editable install
    proc = subprocess.run(
        [sys.executable, "-c", "import minivmm.payload as P; print(P.__file__); "
         "print(P.find_payload('hello_long'))"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    module, found = proc.stdout.splitlines()
    assert Path(module).is_relative_to(site)
    assert Path(found).resolve() == (dest / SHIPPED / "hello_long.asm").resolve()
