"""The README's Python examples run as written (so the README cannot rot)."""
import contextlib
import io
import json
import re

from tests.conftest import ROOT, run_cli


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


def test_readme_trace_ioctls_sample_is_real_output():
    """The --trace-ioctls sample is lines of the command it names, in order (addresses and
    durations aside): it once mixed `run` and `dirty` (a data slot without dirty logging
    next to a dirty ring, which no run maps)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```\n\$ (minivmm [^\n]*--trace-ioctls)\n(.*?)```", text, re.S)
    assert block, "the --trace-ioctls sample names no command"
    args = block.group(1).split()[1:]
    out = run_cli(*args).stdout.splitlines()
    at = 0
    for line in block.group(2).splitlines():
        if line == "...":
            continue
        pattern = re.escape(line)
        pattern = re.sub(r"0x7f[0-9a-f]+", "0x[0-9a-f]+", pattern)
        pattern = re.sub(r"<[0-9]+\\\.[0-9]+\\ us>", r"<[0-9.]+ us>", pattern)
        found = [i for i in range(at, len(out)) if re.fullmatch(pattern, out[i])]
        assert found, f"README sample line not in the output (in order): {line}"
        at = found[0] + 1


def test_readme_caps_json_keys_are_the_output_keys():
    """The README's list of `minivmm caps --json` keys (and of its `ring` object's) is the
    object the command prints, no more and no less."""
    text = " ".join((ROOT / "README.md").read_text().split())
    para = re.search(r"`minivmm caps --json` prints one object: (.*?) `min_entries` is", text)
    assert para, "README no longer lists the caps --json keys"
    ring_part = re.search(r"`ring` \((.*?)\)", para.group(1)).group(1)
    top = set(re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", para.group(1))))
    rep = json.loads(run_cli("caps", "--json").stdout)
    assert set(rep) == top
    assert set(rep["ring"]) == set(re.findall(r"`(\w+)`", ring_part))


def test_readme_picture_is_what_its_command_draws(tmp_path):
    """docs/dirty_random.png is the picture of the command the README names under it (it
    named none, and the picture was of an older --plot). Pixel for pixel where the same
    matplotlib draws it; fonts and antialiasing differ between versions."""
    import pytest
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.image
    import numpy as np
    text = (ROOT / "README.md").read_text()
    found = re.search(r"`(minivmm dirty [^`]*--plot docs/dirty_random\.png)`", text)
    assert found, "the README names no command for docs/dirty_random.png"
    picture = ROOT / "docs" / "dirty_random.png"
    from PIL import Image
    with Image.open(picture) as im:
        software = im.info.get("Software", "")
    if f"Matplotlib version{matplotlib.__version__}," not in software:
        pytest.skip(f"the picture was drawn by {software!r}, not this matplotlib")
    from minivmm import Kvm
    from minivmm.dirty.ring import ring_capability
    with Kvm() as kvm:
        if ring_capability(kvm) is None:      # --tracker both needs it
            pytest.skip("this kernel offers no dirty ring: the picture's command needs it")
    png = tmp_path / "d.png"
    args = found.group(1).replace("docs/dirty_random.png", str(png)).split()[1:]
    assert run_cli(*args).returncode == 0
    assert np.array_equal(matplotlib.image.imread(png), matplotlib.image.imread(picture))
