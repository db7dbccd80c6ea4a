"""The one SQL identifier check every module splices names into SQL with."""

from __future__ import annotations

import pytest

from paylater.identifiers import check_identifier, is_identifier


@pytest.mark.parametrize("name", ["users", "_t", "AvgSpend_7d", "a1"])
def test_plain_identifiers_pass(name: str) -> None:
    assert is_identifier(name)
    assert check_identifier(name, "table") == name


@pytest.mark.parametrize(
    "name", ["users\n", "1st", "", "users; drop", 'a"b', "金額", "a-b", "a.b", None, 3]
)
def test_anything_else_is_refused_naming_what_it_is(name: object) -> None:
    # "users\n" passed the five copies of ^...$: `$` matches before a trailing newline.
    assert not is_identifier(name)

    class SettingError(Exception):
        """A module's own error type."""

    with pytest.raises(SettingError) as refused:
        check_identifier(name, "online table name (PAYLATER_ONLINE_FEATURES_TABLE)", SettingError)
    assert str(refused.value) == (
        f"online table name (PAYLATER_ONLINE_FEATURES_TABLE) {name!r} is not a plain SQL"
        " identifier (ASCII letters, digits and underscores, not starting with a digit)"
    )
