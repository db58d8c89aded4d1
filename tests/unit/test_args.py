"""The argument checker of the Python API, and how the CLI turns its names into options."""
import pytest

from minivmm._args import as_option, check_number, named


@pytest.mark.parametrize("value,kw,error,text", [
    ("2", {}, TypeError, "vcpus must be an int, not str"),
    (2.0, {}, TypeError, "vcpus must be an int, not float"),
    (True, {}, TypeError, "vcpus must be an int, not bool"),      # not a 1
    (0, dict(low=1), ValueError, "vcpus must be at least 1 (got 0)"),
    (9, dict(low=1, high=8), ValueError, "vcpus must be between 1 and 8 (got 9)"),
    (9, dict(high=8, note=" (a note)"), ValueError, "vcpus must be at most 8 (a note) (got 9)"),
])
def test_check_number_names_the_argument(value, kw, error, text):
    with pytest.raises(error) as info:
        check_number("vcpus", value, **kw)
    assert str(info.value) == text and info.value.argument == "vcpus"


def test_seconds_take_ints_and_floats_but_not_nan_or_text():
    check_number("timeout", 1, seconds=True, positive=True)
    check_number("timeout", 0.5, seconds=True, positive=True)
    for bad, error in (("5", TypeError), (False, TypeError), (0, ValueError),
                       (float("nan"), ValueError)):
        with pytest.raises(error, match="^timeout must be"):
            check_number("timeout", bad, seconds=True, positive=True)


def test_the_cli_says_the_option_where_the_api_says_the_keyword():
    assert as_option(named(ValueError("pages must be at least 1 (got 0)"), "pages")) \
        == "--pages must be at least 1 (got 0)"
    assert as_option(named(ValueError("max_time must be positive (got 0)"), "max_time")) \
        == "--max-time must be positive (got 0)"
    assert as_option(named(ValueError("breakpoint x: no label"), "breakpoint")) \
        == "--break x: no label"
    assert as_option(ValueError("a message about no argument")) == "a message about no argument"
