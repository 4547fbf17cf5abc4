"""The one Go-duration parser, shared by the config files and the Snap driver."""
import pytest

from taskd.timeutil import parse_go_duration


@pytest.mark.parametrize("text, ns", [
    ("0", 0), ("60s", 60 * 10**9), ("1m0s", 60 * 10**9), ("1h30m", 5400 * 10**9),
    ("500ms", 500 * 10**6), ("250us", 250_000), ("250µs", 250_000), ("7ns", 7),
    ("1.5s", 1_500_000_000), (".5s", 500_000_000), ("1h2m3s", 3723 * 10**9),
])
def test_go_duration_to_nanoseconds(text, ns):
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize("text", ["", "5", "-5s", "5 m", "m", "5x", "1m-30s", " 10s", None, 10])
def test_go_duration_rejects_anything_else_naming_it(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_go_duration(text)
