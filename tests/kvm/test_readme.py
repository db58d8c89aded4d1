"""The README's Python examples run as written (so the README cannot rot)."""
import contextlib
import io
import re

from tests.conftest import ROOT


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert [l.split()[0] for l in lines[:3]] == ["1", "2", "3"]
    assert all("0 missed" in l for l in lines[:3])
    assert "Hello from long mode" in out.getvalue() and "exited with code 0" in lines[-1]
