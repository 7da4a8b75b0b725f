"""The sender/login binding: which envelope senders an authenticated user may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygw.config import parse_config
from relaygw.receive.senders import SenderDecision, sender_decision
from relaygw.smtp.replies import Reply


def patterns(*texts: str):
    config = parse_config({"listeners": [{"address": "127.0.0.1:25"}],
                           "auth": {"users_file": "users", "senders": {"alice": list(texts)}}},
                          Path("/etc/relaygw"))
    return config.auth.allowed_senders("alice")


ALICE = patterns("alice@example.org", "*@sales.example.org", "re:^alice\\+[a-z]+@example\\.org$")


@pytest.mark.parametrize(("sender", "pattern"), [
    ("alice@example.org", "alice@example.org"),
    ("ALICE@Example.Org", "alice@example.org"),  # case-insensitive, as route senders
    ("anyone@sales.example.org", "*@sales.example.org"),
    ("alice+lists@example.org", "re:^alice\\+[a-z]+@example\\.org$"),
])
def test_a_sender_matching_one_of_the_users_patterns_is_allowed(sender, pattern):
    assert sender_decision("alice", sender, ALICE) == SenderDecision(True, "pattern", pattern)


@pytest.mark.parametrize("sender", [
    "ceo@example.org",
    "alice@example.org.evil.example",  # a glob covers the whole address
    "alice@sub.sales.example.org.x",
    "xalice@example.org",
])
def test_any_other_sender_is_refused_with_553_5_7_1_naming_sender_and_user(sender):
    assert sender_decision("alice", sender, ALICE) == SenderDecision(
        False, "mismatch", None,
        Reply(553, "5.7.1", f"Sender address <{sender}> not allowed for user alice"))


def test_the_null_sender_is_allowed_to_a_bound_user():
    assert sender_decision("alice", "", ALICE) == SenderDecision(True, "null_sender")


def test_a_user_the_table_does_not_list_may_use_any_sender():
    assert sender_decision("bob", "ceo@example.org", None) == SenderDecision(True, "unbound")


def test_a_client_that_did_not_authenticate_is_not_checked():
    assert sender_decision(None, "ceo@example.org", None) == SenderDecision(
        True, "not_authenticated")
