"""docs/tutorial.md runs as written: its ```pycon blocks are one doctest (so it cannot rot).

Every ```pycon block of the tutorial is parsed with doctest.DocTestParser and run, in
file order, in one shared globals namespace (the chapters build on each other), with
ELLIPSIS | NORMALIZE_WHITESPACE. Any mismatch fails the test with the runner's report,
which names the file line of the failing example. The structure is checked too: at
least 6 numbered chapters, each with a `>>>` example, an ioctl name and an api.rst
section number.
"""
import doctest
import io
import re

import pytest

from minivmm import abi
from tests.conftest import ROOT

TUTORIAL = ROOT / "docs" / "tutorial.md"
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_BLOCK = re.compile(r"^```pycon\n(.*?)^```", re.S | re.M)
_CHAPTER = re.compile(r"^## (\d+)\. (.+)$", re.M)
_API_SECTION = re.compile(r"api\.rst(?:,| section)? \d+(?:\.\d+)?")
IOCTLS = set(abi.IOCTL_NAMES.values())


def chapters(text: str) -> list:
    """(number, title, body) for each '## N. Title' section."""
    heads = list(_CHAPTER.finditer(text))
    return [(int(m.group(1)), m.group(2), text[m.end():nxt.start() if nxt else len(text)])
            for m, nxt in zip(heads, heads[1:] + [None])]


def run_pycon_blocks(text: str, name: str, globs: dict) -> tuple:
    """Run every pycon block of ``text`` as doctests sharing ``globs``.

    Returns (failures, attempted, report). Line numbers in the report are file lines.
    """
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = io.StringIO()
    failed = attempted = 0
    for m in _BLOCK.finditer(text):
        lineno = text.count("\n", 0, m.start(1))           # 0-based line of the block
        test = parser.get_doctest(m.group(1), {}, name, name, lineno)
        test.globs = globs          # DocTest copies its globs; the chapters must share them
        result = runner.run(test, out=report.write, clear_globs=False)
        failed += result.failed
        attempted += result.attempted
    return failed, attempted, report.getvalue()


def _close_leftovers(globs: dict) -> None:
    """After a failure mid-tutorial: close VMs, then memory, then /dev/kvm."""
    from minivmm import Kvm, Vm
    from minivmm.memory import GuestMemory
    for kind in (Vm, GuestMemory, Kvm):
        for value in list(globs.values()):
            if isinstance(value, kind):
                try:
                    value.close()
                except Exception:
                    pass


def test_tutorial_structure():
    text = TUTORIAL.read_text()
    found = chapters(text)
    assert len(found) >= 6, f"only {len(found)} numbered chapters"
    assert [n for n, _, _ in found] == list(range(1, len(found) + 1))
    for number, title, body in found:
        where = f"chapter {number} ({title})"
        blocks = _BLOCK.findall(body)
        assert any(">>> " in b for b in blocks), f"{where}: no >>> example"
        named = set(re.findall(r"\bKVM_[A-Z0-9_]+\b", body)) & IOCTLS
        assert named, f"{where}: names no ioctl"
        assert _API_SECTION.search(body), f"{where}: names no api.rst section"


def test_tutorial_runs_as_written():
    text = TUTORIAL.read_text()
    globs = {"__name__": "tutorial"}
    try:
        failed, attempted, report = run_pycon_blocks(text, str(TUTORIAL), globs)
    finally:
        _close_leftovers(globs)
    assert attempted >= 60, f"only {attempted} examples found: is the block syntax intact?"
    if failed:
        pytest.fail(f"{failed} of {attempted} tutorial examples failed:\n{report}",
                    pytrace=False)


def test_the_harness_can_fail():
    """A wrong expected output must be reported, with its file line (guards the regexes)."""
    text = "# t\n\n```pycon\n>>> x = 20\n>>> x + 1\n21\n```\n\n```pycon\n>>> x * 2\n41\n```\n"
    failed, attempted, report = run_pycon_blocks(text, "fake.md", {})
    assert (failed, attempted) == (1, 3)
    assert "line 10" in report and "Expected:\n    41\nGot:\n    40" in report
