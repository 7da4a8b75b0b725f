"""Maildir delivery: layout, exact bytes (LF line ends), durability order, and failures that
never lose mail."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from relaygw.delivery import maildir as maildir_module
from relaygw.delivery.maildir import deliver_to_maildir, unique_name
from relaygw.queue.content import SpoolContent
from relaygw.results import DELIVERED, TRANSIENT, DeliveryResult

SPOOL_HEADER = b"RELAYGW-SPOOL 1\n{\"envelope\": \"not part of the message\"}\n"
MESSAGE = (b"Received: from client.example ([192.0.2.7])\r\n"
           b"From: Alice <alice@sender.example>\r\n"
           b"Subject: hello\r\n"
           b"\r\n"
           b"Hi Bob,\r\n"
           b".leading dot, already unstuffed\r\n"
           b"bye\r\n")
# What the Maildir file holds after the two added lines: the same bytes, each CRLF an LF.
MESSAGE_LF = (b"Received: from client.example ([192.0.2.7])\n"
              b"From: Alice <alice@sender.example>\n"
              b"Subject: hello\n"
              b"\n"
              b"Hi Bob,\n"
              b".leading dot, already unstuffed\n"
              b"bye\n")
NOW = 1700000000.123456
OFFSET = len(SPOOL_HEADER)  # where the message starts in the spool file


@pytest.fixture
def spooled(tmp_path):
    path = tmp_path / "spool-file"
    path.write_bytes(SPOOL_HEADER + MESSAGE)
    return path


def no_thread(fn, *args):
    raise AssertionError("maildir delivery already runs in a thread: it reads blocking")


def content_of(path, offset):
    """The spool's content object for the message at ``path[offset:]``."""
    size = path.stat().st_size - offset if path.exists() else 0
    return SpoolContent(str(path), offset, size, no_thread)


def deliver(box, spooled, content_offset=OFFSET, **kw):
    args = dict(recipient="bob@local.example", sender="alice@sender.example",
                content=content_of(spooled, content_offset), queue_id="0123ABC",
                hostname="relay.example", now=NOW)
    args.update(kw)
    return deliver_to_maildir(box, **args)


def files(directory):
    return sorted(directory.iterdir()) if directory.exists() else []


def test_message_lands_in_new_with_exact_bytes_and_lf_line_ends(tmp_path, spooled):
    box = tmp_path / "Maildir"
    result = deliver(box, spooled)
    assert result == DeliveryResult(DELIVERED, "2.0.0", f"delivered to maildir {box}")
    (path,) = files(box / "new")
    assert path.read_bytes() == (b"Return-Path: <alice@sender.example>\n"
                                 b"Delivered-To: <bob@local.example>\n" + MESSAGE_LF)
    assert files(box / "tmp") == []
    assert files(box / "cur") == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_unique_name_follows_the_maildir_convention(tmp_path, spooled):
    box = tmp_path / "Maildir"
    deliver(box, spooled)
    (path,) = files(box / "new")
    secs, rest = path.name.split(".", 1)
    assert secs == "1700000000"
    assert rest.startswith(f"M123456P{os.getpid()}Q")
    assert rest.endswith(".relay.example")
    assert "R" in rest.split(".")[0]


def test_slash_and_colon_in_the_host_name_are_escaped():
    name = unique_name("odd/host:name", NOW)
    assert name.endswith(r".odd\057host\072name")
    assert "/" not in name and ":" not in name


def test_hundred_deliveries_get_hundred_names(tmp_path, spooled):
    box = tmp_path / "Maildir"
    for _ in range(100):  # same `now` each time: the counter and random part keep them apart
        assert deliver(box, spooled).status == DELIVERED
    names = [p.name for p in files(box / "new")]
    assert len(names) == len(set(names)) == 100
    assert files(box / "tmp") == []


def test_directories_are_created_with_mode_0700_parents_too(tmp_path, spooled):
    old_umask = os.umask(0o022)
    try:
        box = tmp_path / "mail" / "local.example" / "bob"
        assert deliver(box, spooled).status == DELIVERED
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "mail", tmp_path / "mail" / "local.example", box,
                 box / "tmp", box / "new", box / "cur"):
        assert path.is_dir()
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_existing_maildir_is_used_as_it_is(tmp_path, spooled):
    box = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, mode=0o750)
    (box / "cur" / "old-message:2,S").write_bytes(b"old")
    assert deliver(box, spooled).status == DELIVERED
    assert stat.S_IMODE((box / "new").stat().st_mode) == 0o750  # the owner's choice stays
    assert len(files(box / "new")) == 1
    assert (box / "cur" / "old-message:2,S").read_bytes() == b"old"


def test_null_sender_gives_an_empty_return_path(tmp_path, spooled):
    box = tmp_path / "Maildir"
    deliver(box, spooled, sender="")
    (path,) = files(box / "new")
    assert path.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: <bob@local.example>\n")


def test_utf8_addresses_are_written_as_utf8(tmp_path, spooled):
    box = tmp_path / "Maildir"
    deliver(box, spooled, sender="jösé@sender.example", recipient="björn@local.example")
    (path,) = files(box / "new")
    assert path.read_bytes().startswith("Return-Path: <jösé@sender.example>\n"
                                        "Delivered-To: <björn@local.example>\n".encode())


def test_addresses_cannot_add_header_lines(tmp_path, spooled):
    box = tmp_path / "Maildir"
    deliver(box, spooled, sender="a@x.example>\r\nX-Evil: 1", recipient="b@y.example\nBcc: c")
    (path,) = files(box / "new")
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <a@x.example>  X-Evil: 1>\n"
                           b"Delivered-To: <b@y.example Bcc: c>\n" + MESSAGE[:10])


def test_file_is_fsynced_linked_then_new_directory_fsynced(tmp_path, spooled, monkeypatch):
    box = tmp_path / "Maildir"
    (box / "tmp").mkdir(parents=True)
    (box / "new").mkdir()
    (box / "cur").mkdir()
    events = []
    real_fsync, real_link, real_fsync_dir = os.fsync, os.link, maildir_module.fsync_dir
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "link", lambda a, b: (events.append("link"), real_link(a, b))[1])
    monkeypatch.setattr(maildir_module, "fsync_dir",
                        lambda p: (events.append(("fsync_dir", p)), real_fsync_dir(p))[1])
    assert deliver(box, spooled).status == DELIVERED
    assert events[0] == "fsync"  # the message file
    assert events[1] == "link"
    assert events[2] == ("fsync_dir", box / "new")


def test_rename_is_used_where_hard_links_are_not_supported(tmp_path, spooled, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    box = tmp_path / "Maildir"
    assert deliver(box, spooled).status == DELIVERED
    assert len(files(box / "new")) == 1
    assert files(box / "tmp") == []


def test_content_is_copied_in_bounded_chunks(tmp_path, monkeypatch):
    body = b"Subject: big\r\n\r\n" + b"".join(b"line %06d\r\n" % i for i in range(50000))
    spool = tmp_path / "big"
    spool.write_bytes(b"HDR" + body)
    monkeypatch.setattr(maildir_module, "CHUNK_SIZE", 4096)
    sizes = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: (sizes.append(n), real_read(fd, n))[1])
    box = tmp_path / "Maildir"
    assert deliver(box, spool, content_offset=3).status == DELIVERED
    (path,) = files(box / "new")
    assert path.read_bytes().split(b"\n", 2)[2] == body.replace(b"\r\n", b"\n")
    assert len(sizes) > 100 and max(sizes) == 4096


def test_default_chunk_is_one_mebibyte():
    assert maildir_module.CHUNK_SIZE == 1024 * 1024


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1024 * 1024])
def test_crlf_becomes_lf_also_across_chunk_boundaries(tmp_path, spooled, monkeypatch, chunk):
    monkeypatch.setattr(maildir_module, "CHUNK_SIZE", chunk)
    box = tmp_path / "Maildir"
    assert deliver(box, spooled).status == DELIVERED
    (path,) = files(box / "new")
    assert path.read_bytes() == (b"Return-Path: <alice@sender.example>\n"
                                 b"Delivered-To: <bob@local.example>\n" + MESSAGE_LF)


@pytest.mark.parametrize("chunk", [1, 2, 5, 1024 * 1024])
def test_every_other_byte_is_kept(tmp_path, monkeypatch, chunk):
    # A CR without LF (never in the spool, which only holds CRLF, but the copy must not
    # care), NUL, 8-bit bytes and trailing spaces all pass unchanged.
    monkeypatch.setattr(maildir_module, "CHUNK_SIZE", chunk)
    spool = tmp_path / "m"
    spool.write_bytes(b"Subject: x \r\n\r\na\rb\x00\xc3\xa9 \r\r\nend\r")
    box = tmp_path / "Maildir"
    assert deliver(box, spool, content_offset=0).status == DELIVERED
    (path,) = files(box / "new")
    assert path.read_bytes() == (b"Return-Path: <alice@sender.example>\n"
                                 b"Delivered-To: <bob@local.example>\n"
                                 b"Subject: x \n\na\rb\x00\xc3\xa9 \r\nend\r")


def fail_with(code):
    def raiser(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return raiser


def test_disk_full_while_writing_is_transient_4_3_1_and_leaves_nothing(tmp_path, spooled,
                                                                       monkeypatch):
    box = tmp_path / "Maildir"
    monkeypatch.setattr(os, "write", fail_with(errno.ENOSPC))
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.1")
    assert result.text == f"maildir delivery failed: {os.strerror(errno.ENOSPC)}"
    assert files(box / "tmp") == [] and files(box / "new") == []


def test_quota_exceeded_is_transient_4_2_2(tmp_path, spooled, monkeypatch):
    box = tmp_path / "Maildir"
    monkeypatch.setattr(os, "write", fail_with(errno.EDQUOT))
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.2.2")
    assert "mailbox full" in result.text
    assert files(box / "tmp") == [] and files(box / "new") == []


def test_failed_fsync_is_transient_4_3_0_and_leaves_nothing(tmp_path, spooled, monkeypatch):
    box = tmp_path / "Maildir"
    monkeypatch.setattr(os, "fsync", fail_with(errno.EIO))
    result = deliver(box, spooled)
    assert result.status == TRANSIENT
    assert (result.enhanced, result.text) == (
        "4.3.0", f"maildir delivery failed: {os.strerror(errno.EIO)}")
    assert files(box / "tmp") == [] and files(box / "new") == []


def test_failed_directory_fsync_removes_the_new_file_too(tmp_path, spooled, monkeypatch):
    box = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    monkeypatch.setattr(maildir_module, "fsync_dir", fail_with(errno.EIO))
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert files(box / "tmp") == [] and files(box / "new") == []  # the retry makes one copy


def test_name_clash_never_removes_the_other_file(tmp_path, spooled, monkeypatch):
    box = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    monkeypatch.setattr(maildir_module, "unique_name", lambda host, now: "taken")
    (box / "new" / "taken").write_bytes(b"someone else's mail")
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert (box / "new" / "taken").read_bytes() == b"someone else's mail"
    assert files(box / "tmp") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_permission_denied_is_transient(tmp_path, spooled):
    box = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    (box / "tmp").chmod(0o500)
    try:
        result = deliver(box, spooled)
    finally:
        (box / "tmp").chmod(0o700)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert result.text == f"maildir delivery failed: {os.strerror(errno.EACCES)}"
    assert files(box / "new") == []


def test_open_refused_is_transient_4_3_0(tmp_path, spooled, monkeypatch):
    box = tmp_path / "Maildir"
    real_open = os.open

    def refusing_open(path, flags, *args):
        if os.path.dirname(path) == str(box / "tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert result.text == f"maildir delivery failed: {os.strerror(errno.EACCES)}"
    assert files(box / "new") == []


def test_tmp_name_clash_never_removes_the_other_file(tmp_path, spooled, monkeypatch):
    box = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    monkeypatch.setattr(maildir_module, "unique_name", lambda host, now: "taken")
    (box / "tmp" / "taken").write_bytes(b"another delivery in progress")
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert (box / "tmp" / "taken").read_bytes() == b"another delivery in progress"
    assert files(box / "new") == []


def test_maildir_path_that_is_a_file_is_transient(tmp_path, spooled):
    box = tmp_path / "Maildir"
    box.write_bytes(b"not a directory")
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert "not a directory" in result.text
    assert box.read_bytes() == b"not a directory"


def test_subdirectory_that_is_a_file_is_transient(tmp_path, spooled):
    box = tmp_path / "Maildir"
    (box / "tmp").mkdir(parents=True)
    (box / "new").write_bytes(b"")
    result = deliver(box, spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert files(box / "tmp") == []


def test_parent_that_is_a_file_is_transient(tmp_path, spooled):
    (tmp_path / "mail").write_bytes(b"")
    result = deliver(tmp_path / "mail" / "bob", spooled)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")


def test_missing_spool_file_is_transient_and_leaves_nothing(tmp_path):
    box = tmp_path / "Maildir"
    result = deliver(box, tmp_path / "gone", content_offset=0)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert files(box / "tmp") == [] and files(box / "new") == []


def test_unexpected_errors_are_transient_too(tmp_path, spooled):
    box = tmp_path / "Maildir"
    result = deliver(box, spooled, hostname="bad\x00host")  # os.open raises ValueError
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert files(box / "tmp") == [] and files(box / "new") == []


def test_now_defaults_to_the_current_time(tmp_path, spooled):
    box = tmp_path / "Maildir"
    assert deliver(box, spooled, now=None).status == DELIVERED
    (path,) = files(box / "new")
    assert abs(int(path.name.split(".")[0]) - int(time.time())) < 60
