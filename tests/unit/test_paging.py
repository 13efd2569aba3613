import pytest

from services.core.errors import InvalidArgument
from services.core.paging import decode_page_token, encode_page_token


def test_token_round_trips_for_the_same_query():
    token = encode_page_token(40, ["state = RUNNING", "name"])
    assert decode_page_token(token, ["state = RUNNING", "name"]) == 40
    assert decode_page_token("", ["anything"]) == 0


def test_token_from_another_query_or_garbage_is_refused_naming_page_token():
    token = encode_page_token(40, ["a"])
    with pytest.raises(InvalidArgument, match="different filter or order") as info:
        decode_page_token(token, ["b"])
    assert info.value.violations[0].field == "page_token"
    for garbage in ("not-base64!", "eyJ4IjogMX0", encode_page_token(-5)):
        with pytest.raises(InvalidArgument) as info:
            decode_page_token(garbage)
        assert info.value.violations[0].field == "page_token"
