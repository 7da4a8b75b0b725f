"""Reply formatting: the one place replies become wire bytes."""

from __future__ import annotations

from relaygw.smtp.replies import Reply


def test_a_reply_without_text_has_no_trailing_space():
    assert Reply(250, None, "").to_bytes() == b"250\r\n"
    assert Reply(250, "2.0.0", "").to_bytes() == b"250 2.0.0\r\n"
    assert Reply(250, None, "a\n").to_bytes() == b"250-a\r\n250\r\n"


def test_an_empty_auth_challenge_keeps_its_space():
    # RFC 4954 4: continue-req = "334" SP [base64] CRLF
    assert Reply(334, None, "").to_bytes() == b"334 \r\n"
    assert Reply(334, None, "").lines() == ["334 "]
    assert Reply(334, None, "VXNlcm5hbWU6").to_bytes() == b"334 VXNlcm5hbWU6\r\n"
