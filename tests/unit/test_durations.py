import pytest

from tokenlife.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        (90, 90),
        ("30m", 1800),
        ("1h", 3600),
        ("2d", 172800),
        ("1w", 604800),
        (" 5s ", 5),
    ],
)
def test_parse(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a duration"),
        ("1.5h", "not a duration"),
        ("-1", "not a duration"),
        ("0", "must be positive"),
        ("1y", "not a duration"),
        ("400d", "at most 366d"),
        ("1h30m", "not a duration"),
        (True, "expected a duration"),
    ],
)
def test_parse_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


def test_format() -> None:
    assert format_duration(90061) == "1d1h"
    assert format_duration(45) == "45s"
    assert format_duration(0) == "0s"


@pytest.mark.parametrize("text", ["١٢h", "１２h", "۳m", "1٠", "𝟏𝟐h", "12h\u200b"])
def test_only_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
