"""The batch parser on its own: offsets, quoting and hostile lines (pure, fast)."""

import pytest

from handlers.batch_format import parse_rows, read_header, rows_in_range
from handlers.errors import InvalidMessage


def rows(data: bytes, kind: str = "csv", pieces: int = 7):
    chunks = [data[i:i + pieces] for i in range(0, len(data), pieces)]  # tiny download pieces
    header, lines = read_header(chunks, kind)
    return header, list(parse_rows(lines, header, kind))


def test_offsets_let_any_row_range_be_read_again_identically():
    data = (b"\xef\xbb\xbfdeviceId,csr\r\nd0,\r\nd1,\"-----BEGIN\r\nX\r\n-----END\"\r\n"
            b"caf\xc3\xa9,\r\nd3,")
    header, parsed = rows(data)
    assert [r.device_id for r in parsed] == ["d0", "d1", "caf\u00e9", "d3"]
    for first, last in ((0, 1), (1, 3), (2, 4)):
        start = parsed[first - 1].end if first else header.data_start
        again = list(rows_in_range(data[start:parsed[last - 1].end], start, header, "csv", first + 1))
        assert again == parsed[first:last]


def test_a_quote_inside_an_unquoted_cell_is_a_plain_character_not_the_start_of_a_cell():
    _, parsed = rows(b'deviceId\nd0\nab"c\nd2\n')
    assert [r.device_id for r in parsed] == ["d0", 'ab"c', "d2"]  # the id check then names the bad character


def test_an_unclosed_quote_rejects_the_file_naming_the_line_where_it_opened():
    data = b'deviceId,csr\nd0,\nd1,"never closed\nd2,\n'
    with pytest.raises(InvalidMessage, match="line 3: a quoted cell opens there and is never closed") as caught:
        rows(data)
    assert caught.value.field == "file"


def test_an_unclosed_quote_that_would_swallow_the_rows_after_it_rejects_the_file():
    data = b'deviceId\nd0\n"d1\n' + b"".join(b"d%05d\n" % i for i in range(2997))
    with pytest.raises(InvalidMessage, match="line 3: a quoted cell opens there and is not closed within 16384"):
        rows(data)


def test_hostile_json_lines_fail_as_rows():
    data = b"\n\n" + b'{"deviceId": "d0"}\n' + b"[" * 100_000 + b"\n" + b'{"deviceId": "d2", "colour": 1}\n'
    _, parsed = rows(data, "jsonl", pieces=4096)
    assert parsed[0].device_id == "d0" and parsed[0].error is None
    assert "longer than" in parsed[1].error or "not a JSON object" in parsed[1].error
    assert "unknown field(s) 'colour'" in parsed[2].error


def test_a_large_single_piece_is_split_into_every_row():
    data = b"deviceId\n" + b"".join(b"device-%07d\n" % i for i in range(200_000))
    header, lines = read_header([data], "csv")  # one 3.6 MB download piece (speed: `python -m bench intake`)
    assert sum(1 for _ in parse_rows(lines, header, "csv")) == 200_000
