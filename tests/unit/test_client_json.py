"""client_json writes what json.dumps writes and reads what json.loads reads, byte for byte
and value for value; a malformed answer is json's own error."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdsrv import client_json

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

TABLE = [
    {},
    [],
    {"a": {}, "b": [], "c": [[]]},
    {"id": "0f3a", "disks": {"disk0": {"uri": "nbd+unix:///vm/disk0?socket=/run/n.sock"}}},
    ['é\n"\\\u2028', "\x00", "😀"],
    [1e100, -0.0, 12345678901234567890, float("inf"), float("-inf")],
    {3: "int key", 2.5: "float key", True: "bool key", None: "null key"},
    (1, (2,)),
]


@pytest.mark.parametrize("value", TABLE, ids=repr)
def test_text_is_jsons(value: object) -> None:
    assert client_json.dumps(value) == json.dumps(value)
    assert client_json.dumps_indented(value) == json.dumps(value, indent=2)


@given(documents)
def test_any_document_is_written_as_json_writes_it_and_read_back(value: object) -> None:
    assert client_json.dumps(value) == json.dumps(value)
    assert client_json.dumps_indented(value) == json.dumps(value, indent=2)
    text = json.dumps(value)
    # NaN is not equal to itself: compare the texts of what was read.
    assert json.dumps(client_json.loads(text)) == json.dumps(json.loads(text))


@pytest.mark.parametrize(
    "text", ['  {"a": [1, 2.5e3, null, true, "\\u00e9"]}\n', "[NaN, Infinity, -Infinity]", " 3 "]
)
def test_reading_is_jsons(text: str) -> None:
    assert repr(client_json.loads(text)) == repr(json.loads(text))
    assert repr(client_json.loads(text.encode())) == repr(json.loads(text))
    assert math.isnan(client_json.loads("NaN"))


@pytest.mark.parametrize("text", ["", "  ", '{"a": 1} x', "{", "[1,]", "nul", '{"a" 1}'])
def test_a_malformed_document_is_jsons_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as ours:
        client_json.loads(text)
    with pytest.raises(json.JSONDecodeError) as theirs:
        json.loads(text)
    assert str(ours.value) == str(theirs.value)


def test_what_json_cannot_write_is_refused_as_json_refuses_it() -> None:
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        client_json.dumps({"a": object()})
    with pytest.raises(TypeError, match="keys must be"):
        client_json.dumps_indented({(1, 2): "tuple key"})
