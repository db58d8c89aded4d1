"""What the README says of the command line is what the parser does (so the docs cannot
drift): the option list under "## Commands", the defaults it states, the shipped payloads,
and a `--help` line for every option. Needs no KVM."""
import ast
import re

import pytest

from minivmm.cli import build_parser
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
PARSER = build_parser()


def _options(sub) -> set:
    return {o for a in sub._actions for o in a.option_strings} - {"-h", "--help"}


def _synopsis() -> dict:
    """command -> the options its lines in the README's "## Commands" block name."""
    block = re.search(r"## Commands\n\n```\n(.*?)```", README, re.S)
    assert block, "README has no ## Commands block"
    found, command = {}, None
    for line in block.group(1).splitlines():
        m = re.match(r"minivmm (\S+)", line)
        if m:
            command = m.group(1)
            found.setdefault(command, set())
        if command:
            found[command] |= set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line.split("#")[0]))
    return found


def test_readme_synopsis_lists_every_command_and_option():
    synopsis = _synopsis()
    assert set(PARSER.commands) <= set(synopsis), "a command missing from README ## Commands"
    for name, sub in PARSER.commands.items():
        # --trace-ioctls: "every command takes --trace-ioctls", said once below the block
        assert synopsis[name] == _options(sub) - {"--trace-ioctls"}, name
    assert "every command takes `--trace-ioctls`" in README


def test_every_option_has_help_text():
    """--help is where a user looks for an option's values and default (abi-check's
    --format once showed none)."""
    for name, sub in PARSER.commands.items():
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"minivmm {name} {action.option_strings[0]}: no help text"


def _default(command, option):
    sub = PARSER.commands[command]
    return next(a.default for a in sub._actions if option in a.option_strings)


@pytest.mark.parametrize("text, command, option, value", [
    ("default 120 s for `dirty`", "dirty", "--timeout", 120),
    ("10 s for `run`", "run", "--timeout", 10),
    ("`--timeout` (default 10 s) bounds each step", "step", "--timeout", 10),
    ("(default 60 s) bounds the whole session", "step", "--max-time", 60),
    ("`dirty --tracker auto` (the default)", "dirty", "--tracker", "auto"),
])
def test_readme_defaults_are_the_parsers(text, command, option, value):
    assert text in " ".join(README.split()), f"README no longer says: {text}"
    assert _default(command, option) == value


def test_readme_lists_the_shipped_payloads():
    para = re.search(r"Shipped payloads: (.*?)\n\n", README, re.S).group(1)
    named = set(re.findall(r"`(\w+)`", para))
    shipped = {p.stem for p in (ROOT / "guest_payloads").glob("*.asm")}
    assert named == shipped


def test_no_module_docstring_cites_a_path_outside_the_checkout():
    """The ABI notes are cited as docs/abi.md (a copy kept in the repository): a clone has
    no ../shared/abi.md."""
    for path in (ROOT / "minivmm").rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "../shared/" not in doc, path


def test_every_number_of_seconds_is_shown_as_S():
    """The README writes `--timeout S` and step's --help `--max-time S`; the --timeout of
    run, dirty and step showed TIMEOUT, beside --max-time S in the same usage line."""
    from minivmm.cli import _seconds
    seconds = [(name, a) for name, sub in PARSER.commands.items() for a in sub._actions
               if a.type is _seconds]
    assert {a.option_strings[0] for _, a in seconds} == {"--timeout", "--max-time"}
    for name, a in seconds:
        assert a.metavar == "S", f"minivmm {name} {a.option_strings[0]}"
        assert f"{a.option_strings[0]} S" in _synopsis_text(name), name


def _synopsis_text(command) -> str:
    block = re.search(r"## Commands\n\n```\n(.*?)```", README, re.S).group(1)
    return block.split(f"minivmm {command} ", 1)[1].split("\nminivmm ", 1)[0]


def test_readme_synopsis_choices_are_the_parsers():
    """`--tracker ring|bitmap|both|auto` and the like, as argparse's choices."""
    for name, sub in PARSER.commands.items():
        for a in sub._actions:
            if a.choices:
                shown = re.search(rf"{a.option_strings[0]} ([\w|-]+)", _synopsis_text(name))
                assert shown, f"minivmm {name} {a.option_strings[0]}: choices not in README"
                assert shown.group(1).split("|") == list(a.choices), (name, a.option_strings)


def test_a_command_with_a_header_default_says_so_for_vcpus():
    """run and dirty take the payload's `;! vcpus:` header, else 1: their help says both."""
    for name in ("run", "dirty"):
        action = next(a for a in PARSER.commands[name]._actions if a.dest == "vcpus")
        assert action.default is None and "the payload's header, else 1" in action.help


def test_every_environment_variable_minivmm_reads_is_in_the_readme():
    # MINIVMM_FORCE_NO_RING and MINIVMM_DEBUG were read but named nowhere a user looks
    read = set()
    for path in (ROOT / "minivmm").rglob("*.py"):
        read |= set(re.findall(r"\b(MINIVMM_[A-Z_]+)\b", path.read_text()))
    assert {"MINIVMM_KVM_DEVICE", "MINIVMM_FORCE_NO_RING"} <= read     # the scan works
    assert sorted(v for v in read if f"`{v}" not in README) == []


def test_readme_names_only_numpy_functions_minivmm_calls():
    """The numpy row once said bitmaps were counted with numpy 2's `bitwise_count`, else
    unpacked, well after counting moved to int.bit_count and no numpy version mattered."""
    row = re.search(r"^\| numpy \|.*$", README, re.M).group(0)
    source = "\n".join(p.read_text() for p in (ROOT / "minivmm").rglob("*.py"))
    for name in re.findall(r"`([a-z_]+)`", row):
        assert f"np.{name}(" in source, f"README's numpy row names np.{name}, never called"


def test_dirty_timeout_says_both_runs_each_get_it():
    """`--tracker both` runs its two VMs one after the other, each under the whole
    --timeout: the README and --help say so (a user asking 120 s may wait 240)."""
    text = " ".join(README.split())
    assert "each gets the whole `--timeout`" in text
    assert "side by side and" not in text
    sub = PARSER.commands["dirty"]
    help_text = next(a.help for a in sub._actions if "--timeout" in a.option_strings)
    assert "each of its two runs" in help_text
