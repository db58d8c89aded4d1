"""The Makefile's venv rule, dry-run (make -n) in a temporary copy: no install, no network."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this host")


@pytest.fixture
def tree(tmp_path):
    """A copy of the Makefile beside an installed-looking .venv made by this Python, and a
    fake python3 that claims another install and notes each start in ./started."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "pyproject.toml").touch()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")],
                   check=True)
    stamp = tmp_path / ".venv" / ".installed"
    stamp.touch()
    os.utime(stamp, (os.stat(stamp).st_atime, os.stat(tmp_path / "pyproject.toml").st_mtime + 10))
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "python3"
    fake.write_text(f"#!/bin/sh\necho x >> {tmp_path}/started\necho /elsewhere '(3, 99)'\n")
    fake.chmod(0o755)
    return tmp_path


def dry_make(tree, *args, path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS")}
    if path:
        env["PATH"] = f"{path}:{env['PATH']}"
    return subprocess.run(["make", "-n", *args, ".venv/.installed"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_python_given_that_is_not_the_venvs_makes_the_venv_again(tree):
    # `make PYTHON=python3.12 test` over a .venv made by 3.11 tested 3.11, silently
    out = dry_make(tree, f"PYTHON={tree}/bin/python3").stdout
    assert "made by another Python" in out and f"{tree}/bin/python3 -m venv --clear .venv" in out


def test_the_venvs_own_python_given_keeps_the_venv(tree):
    out = dry_make(tree, f"PYTHON={sys.executable}").stdout
    assert "is up to date" in out and "venv --clear" not in out, out


def test_a_plain_make_starts_no_interpreter_to_check(tree):
    # the default python3 (here the fake, first on PATH) is not asked who it is
    out = dry_make(tree, path=tree / "bin").stdout
    assert "is up to date" in out, out
    assert not (tree / "started").exists()
