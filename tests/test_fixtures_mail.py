"""The mail-server fixtures work: real Dovecot, Postfix and smtp-sink, and real clients against them.

These tests speak to the servers directly (no Gatekeeper): they prove that what later
integration tests stand on (TLS verified against the test CA, delivery, refusals,
capture, clean start and stop) does what it says, and that each client helper really
drives its client.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from gatekeeper.testing.pki import TestPKI
from tests.fixtures import clients
from tests.fixtures.dovecot import Dovecot
from tests.fixtures.mailstack import MailStack
from tests.fixtures.process import port_open, processes_under
from tests.fixtures.smtp_sink import SmtpSink

HOST = "127.0.0.1"
ALICE, BOB = "alice@example.org", "bob@example.org"


def message(subject: str, *, to: str = BOB, body: bytes = b"Hello.\r\n") -> bytes:
    """A complete CRLF message with Date and Message-ID, so Postfix adds no header of its own."""
    return (
        f"From: Alice <{ALICE}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: Sun, 01 Mar 2026 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + body


# lines starting with a dot (SMTP dot-stuffing), 8-bit text, a long line, no trailing blank line
TRICKY_BODY = b".leading dot\r\n..two dots\r\n.\r\nGr\xc3\xbc\xc3\x9fe\r\n" + b"x" * 900 + b"\r\nlast line\r\n"


class ServersTests(unittest.TestCase):
    """One stack for the class (reset before each test): protocols, TLS, delivery, refusals."""

    def setUp(self) -> None:
        self.stack = MailStack.for_class(self)
        self.context = ssl.create_default_context(cafile=str(self.stack.ca_file))

    # -- Dovecot ---------------------------------------------------------------------------

    def test_imaps_login_verifies_the_test_ca(self) -> None:
        with imaplib.IMAP4_SSL(HOST, self.stack.imaps_port, ssl_context=self.context, timeout=10) as imap:
            self.assertEqual(imap.login(BOB, "bobpw")[0], "OK")
            self.assertEqual(imap.select("INBOX")[0], "OK")
        other = ssl.create_default_context(cadata=TestPKI("Some Other CA", key_index=7).cert_pem().decode())
        with self.assertRaises(ssl.SSLCertVerificationError):
            imaplib.IMAP4_SSL(HOST, self.stack.imaps_port, ssl_context=other, timeout=10)

    def test_imap_starttls_then_login(self) -> None:
        with imaplib.IMAP4(HOST, self.stack.imap_port, timeout=10) as imap:
            self.assertIn("STARTTLS", imap.capabilities)
            imap.starttls(ssl_context=self.context)
            self.assertEqual(imap.login(ALICE, "alicepw")[0], "OK")

    def test_pop3s_and_stls(self) -> None:
        self.stack.dovecot.deliver(BOB, message("pop"))
        pop: poplib.POP3 = poplib.POP3_SSL(HOST, self.stack.pop3s_port, context=self.context, timeout=10)
        try:
            pop.user(BOB)
            pop.pass_("bobpw")
            self.assertEqual(pop.stat()[0], 1)
        finally:
            pop.quit()
        pop = poplib.POP3(HOST, self.stack.pop3_port, timeout=10)
        try:
            pop.stls(context=self.context)
            pop.user(BOB)
            pop.pass_("bobpw")
            self.assertEqual(pop.stat()[0], 1)
        finally:
            pop.quit()

    def test_wrong_password_is_refused_quickly(self) -> None:
        began = time.monotonic()
        for _ in range(3):  # Dovecot's per-IP penalty (2, 4, 8 s) is switched off
            with imaplib.IMAP4(HOST, self.stack.imap_port, timeout=10) as imap, self.assertRaises(imaplib.IMAP4.error):
                imap.login(BOB, "wrong")
        pop = poplib.POP3_SSL(HOST, self.stack.pop3s_port, context=self.context, timeout=10)
        pop.user(BOB)
        with self.assertRaises(poplib.error_proto):
            pop.pass_("wrong")
        pop.close()
        self.assertLess(time.monotonic() - began, 4.0)

    def test_lmtp_delivery_is_byte_exact(self) -> None:
        sent = message("exact", body=TRICKY_BODY)
        self.stack.dovecot.deliver(BOB, sent, sender=ALICE)
        self.assertEqual(self.stack.dovecot.messages(BOB), [b"Return-Path: <alice@example.org>\r\n" + sent])
        self.assertEqual(self.stack.dovecot.count(BOB), 1)
        self.assertEqual(self.stack.dovecot.count(ALICE), 0)

    def test_append_flags_and_expunge_all(self) -> None:
        dovecot = self.stack.dovecot
        first = dovecot.append(BOB, "Sent", message("one"), [r"\Seen"])
        second = dovecot.append(BOB, "Sent", message("two"), [r"\Seen", r"\Flagged"])
        self.assertLess(first, second)
        self.assertEqual(dovecot.messages(BOB, "Sent"), [message("one"), message("two")])
        self.assertEqual([f - {r"\Recent"} for f in dovecot.flags(BOB, "Sent")], [{r"\Seen"}, {r"\Seen", r"\Flagged"}])
        self.assertEqual(dovecot.count(BOB, "No such box"), 0)
        dovecot.expunge_all(BOB)
        self.assertEqual(dovecot.mailboxes(BOB), ["INBOX"])

    # -- Postfix ---------------------------------------------------------------------------

    def test_smtp_starttls_lands_in_dovecot(self) -> None:
        sent = message("through postfix", body=TRICKY_BODY)
        with smtplib.SMTP(HOST, self.stack.smtp_port, timeout=10) as smtp:
            smtp.ehlo()
            self.assertTrue(smtp.has_extn("starttls"))
            smtp.starttls(context=self.context)
            self.assertEqual(smtp.sendmail(ALICE, [BOB, ALICE], sent), {})
        (stored,) = self.stack.wait_for_messages(BOB, 1)
        self.assertTrue(stored.startswith(b"Return-Path: <alice@example.org>\r\nReceived: from "), stored[:200])
        self.assertTrue(stored.endswith(sent))
        self.assertTrue(self.stack.wait_for_messages(ALICE, 1)[0].endswith(sent))

    def test_unknown_recipient_gets_550_at_rcpt(self) -> None:
        with smtplib.SMTP(HOST, self.stack.smtp_port, timeout=10) as smtp:
            smtp.starttls(context=self.context)
            smtp.mail(ALICE)
            code, text = smtp.rcpt("nobody@example.org")
            self.assertEqual(code, 550, text)
            self.assertIn(b"5.1.1", text)
            self.assertEqual(smtp.rcpt(BOB)[0], 250)

    def test_other_domains_go_to_the_sink(self) -> None:
        sent = message("outside", to="carol@example.net")
        self.assertEqual(self.stack.postfix.send(ALICE, ["carol@example.net"], sent), {})
        (captured,) = self.stack.wait_for_sink(1)
        self.assertEqual(captured.sender, ALICE)
        self.assertEqual(captured.recipients, ("carol@example.net",))
        self.assertTrue(captured.data.startswith(b"Received: from "))
        self.assertTrue(captured.data.endswith(sent))

    def test_submission_needs_tls_and_auth(self) -> None:
        port = self.stack.submission_port
        with smtplib.SMTP(HOST, port, timeout=10) as smtp:
            self.assertEqual(smtp.mail(BOB)[0], 530)  # STARTTLS first
        with smtplib.SMTP(HOST, port, timeout=10) as smtp:
            smtp.starttls(context=self.context)
            smtp.ehlo()
            smtp.user, smtp.password = BOB, "wrong"
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                smtp.auth("PLAIN", smtp.auth_plain)  # login() would try PLAIN, then LOGIN: 0.5 s each
        with smtplib.SMTP(HOST, port, timeout=10) as smtp:
            smtp.starttls(context=self.context)
            smtp.ehlo()
            smtp.mail(BOB)
            self.assertEqual(smtp.rcpt("dave@example.net")[0], 554)  # no relaying without AUTH
        self.assertEqual(
            self.stack.postfix.send(BOB, ["dave@example.net"], message("sub"), submission=True, login=(BOB, "bobpw")),
            {},
        )
        self.assertEqual(self.stack.wait_for_sink(1)[0].recipients, ("dave@example.net",))

    def test_user_added_while_running(self) -> None:
        self.stack.add_user("carl@example.org", "carlpw")
        self.stack.postfix.send(ALICE, ["carl@example.org"], message("new user", to="carl@example.org"))
        self.assertEqual(len(self.stack.wait_for_messages("carl@example.org", 1)), 1)

    def test_reset_leaves_no_mail_behind(self) -> None:
        self.stack.dovecot.deliver(BOB, message("old"))
        self.stack.dovecot.append(ALICE, "Drafts", message("draft"))
        self.stack.postfix.send(ALICE, ["erin@example.net"], message("old outside"))
        self.stack.wait_for_sink(1)
        self.assertIs(MailStack.for_class(self), self.stack)  # same stack, reset
        self.assertEqual(self.stack.dovecot.count(BOB), 0)
        self.assertEqual(self.stack.dovecot.mailboxes(ALICE), ["INBOX"])
        self.assertEqual(self.stack.sink.messages(), [])

    def test_wait_without_blocking_the_reactor(self) -> Deferred[None]:
        self.stack.postfix.send(ALICE, [BOB], message("async"))
        waiting = self.stack.deferred_wait_for_messages(reactor, BOB, 1)

        def check(found: list[bytes]) -> None:
            self.assertTrue(found[0].endswith(message("async")))

        return waiting.addCallback(check)


class SinkTests(unittest.TestCase):
    """smtp-sink on its own: capture, envelope, fault injection."""

    def test_captures_byte_exact_with_envelope(self) -> None:
        sink = SmtpSink()
        self.addCleanup(sink.cleanup)
        sink.start()
        sent = message("sink", to="x@example.net", body=TRICKY_BODY)
        with smtplib.SMTP(HOST, sink.port, timeout=10) as smtp:
            smtp.sendmail(ALICE, ["x@example.net", "y@example.net"], sent)
        (captured,) = sink.messages()
        self.assertEqual(captured.data, sent)
        self.assertEqual(captured.sender, ALICE)
        self.assertEqual(captured.recipients, ("x@example.net", "y@example.net"))
        self.assertEqual(captured.client_addr, HOST)

    def test_fault_injection_and_stop(self) -> None:
        sink = SmtpSink(extra_args=["-r", "RCPT"])
        self.addCleanup(sink.cleanup)
        sink.start()
        with smtplib.SMTP(HOST, sink.port, timeout=10) as smtp:
            smtp.mail(ALICE)
            self.assertEqual(smtp.rcpt("x@example.net")[0] // 100, 4)
        sink.stop()
        self.assertFalse(port_open(sink.port))
        self.assertEqual(processes_under(sink.directory), [])


class LifecycleTests(unittest.TestCase):
    """Stacks side by side, and what stop() leaves behind (nothing)."""

    def test_two_stacks_at_once_and_stop_leaves_nothing(self) -> None:
        began = time.monotonic()
        first = MailStack.for_test(self)
        second = MailStack.for_test(self)
        started = time.monotonic() - began
        self.assertFalse(set(first.ports) & set(second.ports))
        first.postfix.send(ALICE, [BOB], message("first"))
        second.postfix.send(ALICE, [BOB], message("second"))
        self.assertTrue(first.wait_for_messages(BOB, 1)[0].endswith(message("first")))
        self.assertTrue(second.wait_for_messages(BOB, 1)[0].endswith(message("second")))
        self.assertEqual(first.dovecot.count(BOB), 1)
        self.assertEqual(second.dovecot.count(BOB), 1)
        self.assertTrue(processes_under(first.directory))
        began = time.monotonic()
        first.stop()
        stopped = time.monotonic() - began
        self.assertEqual(processes_under(first.directory), [])
        self.assertEqual([p for p in first.ports if port_open(p)], [])
        self.assertEqual(len(second.dovecot.messages(BOB)), 1)  # the other stack is untouched
        second.stop()
        self.assertEqual(processes_under(second.directory), [])
        self.assertEqual([p for p in second.ports if port_open(p)], [])
        self.assertLess(started, 5.0)
        self.assertLess(stopped, 2.0)

    def test_dovecot_alone_restarts_in_its_directory(self) -> None:
        dovecot = Dovecot()
        self.addCleanup(dovecot.cleanup)
        dovecot.add_user(BOB, "bobpw")
        dovecot.start()
        dovecot.deliver(BOB, message("kept"))
        dovecot.stop()
        self.assertFalse(dovecot.running)
        self.assertEqual([p for p in dovecot.ports if port_open(p)], [])
        dovecot.start()
        self.assertEqual(dovecot.messages(BOB), [b"Return-Path: <sender@example.net>\r\n" + message("kept")])


class ClientTests(unittest.TestCase):
    """The client helpers drive real clients against Postfix and Dovecot directly."""

    def setUp(self) -> None:
        self.stack = MailStack.for_class(self)
        self.ca = self.stack.ca_file

    def test_swaks_starttls_is_byte_exact(self) -> None:
        sent = message("swaks", body=TRICKY_BODY + b"%DATE% stays as it is\r\n")
        run = clients.swaks_send(HOST, self.stack.smtp_port, ALICE, [BOB], sent, ca_file=self.ca)
        run.check()
        self.assertIn("STARTTLS", run.output)
        self.assertTrue(self.stack.wait_for_messages(BOB, 1)[0].endswith(sent))
        refused = clients.swaks_send(HOST, self.stack.smtp_port, ALICE, ["nobody@example.org"], sent, ca_file=self.ca)
        self.assertEqual(refused.returncode, 24, refused.output)  # refused at RCPT
        other_ca = Path(self.mktemp())
        other_ca.write_bytes(TestPKI("Some Other CA", key_index=7).cert_pem())
        untrusted = clients.swaks_send(HOST, self.stack.smtp_port, ALICE, [BOB], sent, ca_file=other_ca)
        self.assertEqual(untrusted.returncode, 29, untrusted.output)  # TLS failed

    def test_swaks_submission_with_auth(self) -> None:
        run = clients.swaks_send(
            HOST,
            self.stack.submission_port,
            BOB,
            ["f@example.net"],
            message("auth"),
            ca_file=self.ca,
            auth=(BOB, "bobpw"),
        )
        run.check()
        self.assertEqual(self.stack.wait_for_sink(1)[0].data.split(b"\r\n\r\n", 1)[1], b"Hello.\r\n")

    def test_msmtp_submission(self) -> None:
        run = clients.msmtp_send(
            HOST,
            self.stack.submission_port,
            BOB,
            ["g@example.net"],
            message("msmtp"),
            ca_file=self.ca,
            auth=(BOB, "bobpw"),
        )
        run.check()
        self.assertIn("smtpstatus=250", run.output)
        self.assertTrue(self.stack.wait_for_sink(1)[0].data.endswith(message("msmtp")))
        bad = clients.msmtp_send(
            HOST, self.stack.submission_port, BOB, ["g@example.net"], message("x"), ca_file=self.ca, auth=(BOB, "no")
        )
        self.assertEqual(bad.returncode, 77, bad.output)  # EX_NOPERM: authentication failed

    def test_mutt_sends_and_reads(self) -> None:
        draft = b"From: bob@example.org\nTo: alice@example.org\nSubject: from mutt\n\nWritten in mutt.\n"
        sent = clients.mutt_send(HOST, self.stack.submission_port, draft, ca_file=self.ca, auth=(BOB, "bobpw"))
        sent.check()
        self.assertIn(b"Written in mutt.", self.stack.wait_for_messages(ALICE, 1)[0])
        self.stack.dovecot.deliver(ALICE, message("second"))
        fetched = clients.mutt_fetch(HOST, self.stack.imaps_port, ALICE, "alicepw", ca_file=self.ca)
        fetched.run.check()
        self.assertEqual(len(fetched.messages), 2)
        self.assertIn(b"Subject: from mutt", fetched.messages[0].data)
        self.assertIn(b"Subject: second", fetched.messages[1].data)

    def test_mpop_fetches_over_pop3s(self) -> None:
        sent = message("mpop", body=TRICKY_BODY)
        self.stack.dovecot.deliver(BOB, sent, sender=ALICE)
        work = Path(self.mktemp())
        result = clients.mpop_fetch(HOST, self.stack.pop3s_port, BOB, "bobpw", ca_file=self.ca, workdir=work)
        result.run.check()
        self.assertEqual([m.crlf() for m in result.messages], [b"Return-Path: <alice@example.org>\r\n" + sent])
        again = clients.mpop_fetch(HOST, self.stack.pop3s_port, BOB, "bobpw", ca_file=self.ca, workdir=work)
        self.assertEqual(again.messages, ())  # already seen (UIDL), still on the server (keep)
        self.assertEqual(self.stack.dovecot.count(BOB), 1)
        bad = clients.mpop_fetch(HOST, self.stack.pop3s_port, BOB, "wrong", ca_file=self.ca)
        self.assertEqual(bad.run.returncode, 77, bad.run.output)

    def test_fetchmail_fetches_with_stls(self) -> None:
        self.stack.dovecot.deliver(BOB, message("fm one"))
        self.stack.dovecot.deliver(BOB, message("fm two"))
        result = clients.fetchmail_fetch(
            HOST, self.stack.pop3_port, BOB, "bobpw", ca_file=self.ca, tls="starttls", keep=False
        )
        result.run.check()
        self.assertEqual(len(result.messages), 2)
        self.assertTrue(result.messages[0].crlf().endswith(message("fm one")))
        self.assertEqual(
            result.messages[1].without_headers("Received"), b"Return-Path: <sender@example.net>\r\n" + message("fm two")
        )
        self.assertEqual(self.stack.dovecot.count(BOB), 0)  # keep=False deleted them

    def test_mbsync_pulls_over_imaps(self) -> None:
        self.stack.dovecot.deliver(BOB, message("inbox mail"))
        self.stack.dovecot.append(BOB, "Archive", message("archived"), [r"\Seen"])
        maildir = Path(self.mktemp())
        result = clients.mbsync_sync("localhost", self.stack.imaps_port, BOB, "bobpw", ca_file=self.ca, maildir=maildir)
        result.run.check()
        self.assertEqual(sorted(result.mailboxes), ["Archive", "INBOX"])
        (archived,) = result.mailboxes["Archive"]
        self.assertEqual(archived.without_headers("X-TUID"), message("archived"))
        self.assertEqual(archived.flags, "S")
        (inbox,) = result.mailboxes["INBOX"]
        self.assertEqual(
            inbox.without_headers("X-TUID"), b"Return-Path: <sender@example.net>\r\n" + message("inbox mail")
        )
        # and back: a message written locally is pushed to the server
        (maildir / "Archive" / "new" / "1.local").write_bytes(message("pushed").replace(b"\r\n", b"\n"))
        pushed = clients.mbsync_sync(
            "localhost", self.stack.imaps_port, BOB, "bobpw", ca_file=self.ca, maildir=maildir, direction="push"
        )
        pushed.run.check()
        self.assertEqual(self.stack.dovecot.count(BOB, "Archive"), 2)
