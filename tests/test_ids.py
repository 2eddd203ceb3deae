import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pki import InvalidRegistrationId
from pki.ids import check_registration_id, registration_id_problem
from pki.profiles import new_serial

_BODY = string.ascii_lowercase + string.digits + "-._:"
_LAST = string.ascii_lowercase + string.digits + "-"
valid_ids = st.builds(lambda body, last: body + last, st.text(_BODY, max_size=63), st.sampled_from(_LAST))


@given(valid_ids)
def test_every_id_made_of_the_allowed_alphabet_is_accepted(device_id):
    assert check_registration_id(device_id) == device_id


@given(valid_ids, st.integers(min_value=0, max_value=63), st.sampled_from(string.ascii_uppercase))
def test_an_uppercase_letter_anywhere_is_refused_as_not_lowercase(device_id, position, upper):
    position = min(position, len(device_id) - 1)
    bad = device_id[:position] + upper + device_id[position + 1:]
    assert "lowercase" in registration_id_problem(bad)


@given(st.text(min_size=1, max_size=80))
def test_the_validator_never_crashes_and_agrees_with_itself(value):
    problem = registration_id_problem(value)
    if problem is None:
        assert check_registration_id(value) == value
    else:
        with pytest.raises(InvalidRegistrationId):
            check_registration_id(value)


@pytest.mark.parametrize("value, message", [
    ("Device-1", "must be lowercase: 'D' at position 1"),
    ("a" * 65, "at most 64 characters, got 65"),
    ("", "must not be empty"),
    ("dev ice", "' ' at position 4 is not allowed"),
    ("device.", "must end in a letter, a digit or '-'"),
    ("device:", "must end in a letter, a digit or '-'"),
    ("gerät", "'ä' at position 4 is not allowed"),
])
def test_each_broken_rule_is_named(value, message):
    with pytest.raises(InvalidRegistrationId) as caught:
        check_registration_id(value, field="deviceId")
    assert message in str(caught.value)
    assert str(caught.value).startswith("deviceId: ")


def test_non_strings_are_refused():
    assert "must be a string" in registration_id_problem(42)


def test_sixty_four_characters_is_the_limit():
    assert check_registration_id("a" * 64)


@given(st.integers(min_value=1, max_value=5))
def test_serials_are_positive_at_most_20_octets_and_not_repeated(_):
    serials = [new_serial() for _ in range(2000)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2 ** 160 for s in serials)
    # >= 64 bits of entropy: with 159 random bits, 2000 draws all below 2**100 would be absurd.
    assert max(serials).bit_length() > 100
