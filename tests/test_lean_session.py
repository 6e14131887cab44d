"""LeanSession: jupyter_client's message decoding, less the date parsing; the signature checks unchanged."""

from __future__ import annotations

import pytest
from jupyter_client.session import Session

from runflare_server.engine.jupyter.lean_session import LeanSession

KEY = b"0123456789abcdef0123456789abcdef"


def _wire(session: Session, buffers: list[bytes] | None = None) -> tuple[dict, list[bytes]]:
    """A stream message replying to an execute_request, as the frames a kernel sends (no identities)."""
    parent = session.msg("execute_request", {"code": "print(1)"})
    msg = session.msg("stream", {"name": "stdout", "text": "1\n"}, parent=parent, metadata={"m": [1, 2]})
    _, frames = session.feed_identities(session.serialize(msg))
    return msg, frames + (buffers or [])


def test_a_message_decodes_as_jupyter_client_decodes_it_with_its_dates_as_strings():
    sender = Session(key=KEY)
    msg, frames = _wire(sender, [b"\x00\x01binary"])
    lean = LeanSession(key=KEY).deserialize(list(frames))
    full = Session(key=KEY).deserialize(list(frames))
    assert isinstance(lean["header"]["date"], str)
    assert isinstance(lean["parent_header"]["date"], str)
    assert lean["header"]["date"] == msg["header"]["date"].isoformat().replace("+00:00", "Z")
    for part in ("header", "parent_header"):
        assert {k: v for k, v in lean[part].items() if k != "date"} == \
            {k: v for k, v in full[part].items() if k != "date"}
    for key in ("msg_id", "msg_type", "metadata", "content"):
        assert lean[key] == full[key]
    assert [bytes(b) for b in lean["buffers"]] == [b"\x00\x01binary"]


def test_frames_pyzmq_did_not_copy_decode_too():
    zmq = pytest.importorskip("zmq")
    _, frames = _wire(Session(key=KEY))
    lean = LeanSession(key=KEY).deserialize([zmq.Frame(f) for f in frames], copy=False)
    assert lean["content"] == {"name": "stdout", "text": "1\n"}


def test_content_can_stay_packed():
    _, frames = _wire(Session(key=KEY))
    assert LeanSession(key=KEY).deserialize(list(frames), content=False)["content"] == frames[4]


def test_a_forged_signature_is_refused():
    _, frames = _wire(Session(key=b"another key"))
    with pytest.raises(ValueError, match="Invalid Signature"):
        LeanSession(key=KEY).deserialize(list(frames))


def test_a_tampered_content_is_refused():
    _, frames = _wire(Session(key=KEY))
    frames[4] = frames[4].replace(b"1\\n", b"2\\n")
    with pytest.raises(ValueError, match="Invalid Signature"):
        LeanSession(key=KEY).deserialize(list(frames))


def test_an_unsigned_message_is_refused():
    _, frames = _wire(Session(key=KEY))
    with pytest.raises(ValueError, match="Unsigned"):
        LeanSession(key=KEY).deserialize([b"", *frames[1:]])


def test_a_replayed_message_is_refused():
    _, frames = _wire(Session(key=KEY))
    lean = LeanSession(key=KEY)
    lean.deserialize(list(frames))
    with pytest.raises(ValueError, match="Duplicate Signature"):
        lean.deserialize(list(frames))


def test_a_truncated_message_is_refused():
    session = LeanSession(key=b"")  # no key: no signature to check, so the length check is what refuses it
    with pytest.raises(TypeError, match="malformed"):
        session.deserialize([b"", b"{}", b"{}"])
