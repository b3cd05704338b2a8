"""Tests for gatekeeper.localstore: the embedded mail store's engine (folders, messages, flags, quotas, restarts)."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.errors import InvalidAddress, PermanentError, TemporaryError
from gatekeeper.localstore import (
    DELETED,
    FLAGGED,
    INBOX,
    SEEN,
    FolderExists,
    FolderNotAllowed,
    InvalidArgument,
    InvalidFlag,
    InvalidFolderName,
    LocalStore,
    Mailbox,
    MailboxFull,
    MessageTooLarge,
    NoSuchFolder,
    NoSuchMessage,
    Notice,
    NotLocalDomain,
    Quota,
    SearchQuery,
    StoreUnavailable,
    UidValidityChanged,
    UnknownMailbox,
    folder_name,
)
from gatekeeper.localstore.mailbox import EXPUNGE_HISTORY_SECONDS, FOLDER_FILE, FOLDERS, INDEX_FILE
from gatekeeper.localstore.names import flags_from_info, info_suffix, parse_flags

USERS = {"alice@example.org", "bob@example.org", "carol@example.net"}
MESSAGE = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nHello Bob.\r\n"
ZONE = datetime.timezone(datetime.timedelta(hours=2))


class FakeClock:
    """A settable time source (seconds since the epoch)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def known_user(address: str) -> bool:
    return address.casefold() in USERS


class StoreCase(SynchronousTestCase):
    """Opens stores under a fresh temporary directory and closes them after the test."""

    def setUp(self) -> None:
        self.data_dir = Path(self.mktemp())
        self.clock = FakeClock()

    def open_store(self, **kwargs: object) -> LocalStore:
        options: dict[str, object] = {"domains": ["example.org", "example.net"], "users": known_user}
        options.update(kwargs)
        store = LocalStore(self.data_dir, clock=self.clock, **options)  # type: ignore[arg-type]
        self.addCleanup(store.close)
        return store

    def bob(self, **kwargs: object) -> Mailbox:
        return self.open_store(**kwargs).mailbox("bob@example.org")

    def restart(self, store: LocalStore, **kwargs: object) -> LocalStore:
        store.close()
        return self.open_store(**kwargs)

    def folder_path(self, mailbox: Mailbox, name: str) -> Path:
        with sqlite3.connect(mailbox.root / INDEX_FILE) as db:
            (directory,) = db.execute("SELECT dir FROM folders WHERE name = ?", (name,)).fetchone()
        return mailbox.root / FOLDERS / directory


class NameTests(SynchronousTestCase):
    def test_inbox_is_matched_in_any_case_other_names_are_not(self) -> None:
        self.assertEqual(folder_name("inbox"), INBOX)
        self.assertEqual(folder_name("InBoX/Sub"), "INBOX/Sub")
        self.assertEqual(folder_name("Sent"), "Sent")
        self.assertNotEqual(folder_name("sent"), folder_name("Sent"))
        self.assertEqual(folder_name("Inboxes"), "Inboxes")

    def test_names_are_nfc_unicode(self) -> None:
        composed, decomposed = "Entw\u00fcrfe", "Entwu\u0308rfe"
        self.assertEqual(folder_name(decomposed), composed)
        self.assertEqual(folder_name("Проекты/2024"), "Проекты/2024")

    def test_bad_names_are_refused_with_the_reason(self) -> None:
        bad = {
            "": "empty",
            "/a": "empty level",
            "a/": "empty level",
            "a//b": "empty level",
            "a/../b": ". or ..",
            ".": ". or ..",
            "a*": "*, %",
            "a%b": "*, %",
            "a\x00b": "control",
            "a\nb": "control",
            "a\x85b": "control",
            " a": "space",
            "a/b ": "space",
            "x" * 256: "too long",
            "/".join("a" * 17): "too deep",
        }
        for name, reason in bad.items():
            with self.assertRaises(InvalidFolderName, msg=repr(name)) as caught:
                folder_name(name)
            self.assertIn(reason, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
        self.assertIsInstance(InvalidFolderName("x"), PermanentError)

    def test_flags_are_canonical_and_checked(self) -> None:
        bits, keywords = parse_flags(["\\seen", "\\FLAGGED", "$Junk", "$junk", "Work"])
        self.assertEqual(info_suffix(bits), ":2,FS")
        self.assertEqual(keywords, ("$Junk", "Work"))
        for bad in ("\\Recent", "\\Unknown", "two words", "(paren", 'quote"', "", "k" * 65, "br]acket"):
            self.assertRaises(InvalidFlag, parse_flags, [bad])
        self.assertRaises(InvalidFlag, parse_flags, "\\Seen")  # one string, not a collection
        self.assertRaises(InvalidFlag, parse_flags, [f"k{n}" for n in range(65)])

    def test_maildir_info_letters(self) -> None:
        self.assertEqual(info_suffix(flags_from_info("123.x.host:2,DFRST")), ":2,DFRST")
        self.assertEqual(flags_from_info("123.x.host"), 0)
        self.assertEqual(info_suffix(flags_from_info("123.x.host:2,Sa")), ":2,S")


class LayoutTests(StoreCase):
    def test_files_are_0600_and_directories_0700_whatever_the_umask(self) -> None:
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        store.deliver(["bob@example.org", "alice@example.org"], MESSAGE)
        mailbox.append("Sent", MESSAGE, flags=[SEEN])
        mailbox.create_folder("Projects/2024")
        mailbox.copy(INBOX, [1], "Projects/2024")
        checked = 0
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            self.assertEqual(mode, 0o700 if path.is_dir() else 0o600, str(path))
            checked += 1
        self.assertGreater(checked, 30)
        self.assertTrue((mailbox.root / (INDEX_FILE + "-wal")).exists())

    def test_one_process_owns_the_store(self) -> None:
        store = self.open_store()
        with self.assertRaises(StoreUnavailable) as caught:
            LocalStore(self.data_dir)
        self.assertIn("in use", str(caught.exception))
        self.assertIsInstance(caught.exception, TemporaryError)
        store.close()
        self.open_store().mailbox("bob@example.org")

    def test_closed_store_and_mailbox_refuse_work(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        store.close()
        store.close()
        self.assertRaises(StoreUnavailable, store.mailbox, "bob@example.org")
        self.assertRaises(StoreUnavailable, mailbox.status, INBOX)
        self.assertTrue(mailbox.closed)

    def test_addresses_are_case_insensitive_and_directory_names_safe(self) -> None:
        store = self.open_store(users=None)
        first = store.mailbox("Bob@Example.ORG")
        self.assertIs(store.mailbox("bob@example.org"), first)
        self.assertEqual(first.address, "Bob@example.org")
        odd = store.mailbox("a/b/{c}@example.org")
        self.assertEqual(odd.root.parent, self.data_dir / "mailboxes")
        self.assertEqual(
            sorted(p.name for p in (self.data_dir / "mailboxes").iterdir()), sorted([first.root.name, odd.root.name])
        )
        self.assertRaises(InvalidAddress, store.mailbox, "not an address")


class RemoveMailboxTests(StoreCase):
    def test_removing_a_mailbox_deletes_its_mail(self) -> None:
        store = self.open_store()
        store.deliver(["bob@example.org"], MESSAGE)
        old = store.mailbox("bob@example.org")
        root = old.root
        self.assertTrue(store.mailbox_exists("BOB@example.org"))
        self.assertTrue(store.remove_mailbox("Bob@Example.org"))
        self.assertTrue(old.closed)
        self.assertFalse(root.exists())
        self.assertEqual(list((self.data_dir / "mailboxes").iterdir()), [])
        self.assertFalse(store.remove_mailbox("bob@example.org"))
        self.assertEqual(store.mailbox("bob@example.org").status(INBOX).messages, 0)


class DeliveryTests(StoreCase):
    def test_domains_and_users_decide_who_is_local(self) -> None:
        store = self.open_store()
        self.assertEqual(store.check_recipient("<Bob@EXAMPLE.org>"), "Bob@example.org")
        self.assertTrue(store.is_local_domain("x@example.org"))
        self.assertFalse(store.is_local_domain("x@example.com"))
        self.assertFalse(store.is_local_domain("garbage"))
        with self.assertRaises(UnknownMailbox) as unknown:
            store.check_recipient("dave@example.org")
        self.assertEqual(unknown.exception.enhanced_status, "5.1.1")
        self.assertIsInstance(unknown.exception, PermanentError)
        with self.assertRaises(NotLocalDomain) as remote:
            store.check_recipient("bob@example.com")
        self.assertIsInstance(remote.exception, PermanentError)
        self.assertRaises(InvalidAddress, store.check_recipient, "bob@@example.org")
        self.assertFalse(store.mailbox_exists("dave@example.org"))

    def test_without_domains_only_known_users_are_local(self) -> None:
        store = self.open_store(domains=())
        self.assertEqual(store.check_recipient("carol@example.net"), "carol@example.net")
        self.assertRaises(NotLocalDomain, store.check_recipient, "someone@gmail.com")

    def test_deliver_to_several_recipients_each_on_its_own(self) -> None:
        store = self.open_store()
        report = store.deliver(
            ["bob@example.org", "ALICE@example.org", "bob@EXAMPLE.org", "dave@example.org", "x@elsewhere.com", "bad"],
            MESSAGE,
        )
        self.assertEqual([d.address for d in report.delivered], ["bob@example.org", "ALICE@example.org"])
        self.assertFalse(report.all_delivered)
        self.assertEqual(
            [(r.address, r.temporary, r.enhanced_status) for r in report.refused],
            [("dave@example.org", False, "5.1.1"), ("x@elsewhere.com", False, "5.7.1"), ("bad", False, "5.1.3")],
        )
        for delivered in report.delivered:
            mailbox = store.mailbox(delivered.address)
            self.assertEqual(mailbox.read_message(INBOX, delivered.uid), MESSAGE)
            self.assertEqual(mailbox.status(INBOX).uidvalidity, delivered.uidvalidity)
            inbox = self.folder_path(mailbox, INBOX)
            self.assertEqual(len(os.listdir(inbox / "new")), 1)
            self.assertEqual(os.listdir(inbox / "tmp"), [])
            info = mailbox.message(INBOX, delivered.uid)
            self.assertEqual((info.size, info.flags), (len(MESSAGE), frozenset()))
            self.assertEqual(info.internal_date.timestamp(), self.clock.now)

    def test_deliver_from_a_file_object(self) -> None:
        store = self.open_store()
        report = store.deliver(["bob@example.org", "alice@example.org"], io.BytesIO(MESSAGE))
        self.assertTrue(report.all_delivered)
        for delivered in report.delivered:
            self.assertEqual(store.mailbox(delivered.address).read_message(INBOX, delivered.uid), MESSAGE)

    def test_nobody_to_deliver_to_writes_nothing(self) -> None:
        store = self.open_store()
        report = store.deliver(["dave@example.org"], MESSAGE)
        self.assertEqual((report.delivered, len(report.refused)), ((), 1))
        self.assertFalse(store.mailbox_exists("dave@example.org"))

    def test_deliver_into_another_folder(self) -> None:
        store = self.open_store()
        report = store.deliver(["bob@example.org"], MESSAGE, folder="Drafts")
        self.assertEqual(store.mailbox("bob@example.org").read_message("Drafts", report.delivered[0].uid), MESSAGE)
        report = store.deliver(["bob@example.org"], MESSAGE, folder="Nowhere")
        self.assertEqual(report.refused[0].address, "bob@example.org")


class FolderTests(StoreCase):
    def test_a_new_mailbox_has_the_four_folders_subscribed(self) -> None:
        mailbox = self.bob()
        folders = {f.name: f for f in mailbox.folders()}
        self.assertEqual(sorted(folders), ["Drafts", INBOX, "Sent", "Trash"])
        self.assertEqual(folders["Sent"].special_use, "\\Sent")
        self.assertIn("\\Trash", folders["Trash"].attributes)
        self.assertIn("\\HasNoChildren", folders[INBOX].attributes)
        self.assertTrue(all(f.subscribed and f.selectable for f in folders.values()))
        self.assertEqual(mailbox.subscriptions(), ["Drafts", INBOX, "Sent", "Trash"])
        validities = [mailbox.status(name).uidvalidity for name in folders]
        self.assertEqual(len(set(validities)), 4)

    def test_create_makes_missing_levels(self) -> None:
        mailbox = self.bob()
        self.assertEqual(mailbox.create_folder("Projects/Gate\u00adkeeper/2024"), "Projects/Gate\u00adkeeper/2024")
        folders = {f.name: f for f in mailbox.folders()}
        self.assertIn("\\HasChildren", folders["Projects"].attributes)
        self.assertIn("\\HasNoChildren", folders["Projects/Gate\u00adkeeper/2024"].attributes)
        self.assertFalse(folders["Projects"].subscribed)
        self.assertRaises(FolderExists, mailbox.create_folder, "Projects")
        self.assertRaises(FolderExists, mailbox.create_folder, "inbox")
        self.assertRaises(InvalidFolderName, mailbox.create_folder, "Bad/*")
        self.assertRaises(InvalidArgument, mailbox.create_folder, "Odd", special_use="\\Odd")
        self.assertEqual(mailbox.create_folder("Junk", special_use="\\Junk"), "Junk")
        self.assertEqual(mailbox.create_folder("INBOX/Sub"), "INBOX/Sub")
        self.assertIn("\\HasChildren", {f.name: f for f in mailbox.folders()}[INBOX].attributes)

    def test_delete_a_leaf_removes_it_and_its_files(self) -> None:
        mailbox = self.bob()
        mailbox.create_folder("Old")
        mailbox.append("Old", MESSAGE)
        path = self.folder_path(mailbox, "Old")
        validity = mailbox.status("Old").uidvalidity
        mailbox.delete_folder("Old")
        self.assertFalse(path.exists())
        self.assertNotIn("Old", [f.name for f in mailbox.folders()])
        self.assertRaises(NoSuchFolder, mailbox.status, "Old")
        self.assertEqual(mailbox.usage().messages, 0)
        mailbox.create_folder("Old")
        self.assertGreater(mailbox.status("Old").uidvalidity, validity)
        self.assertEqual(mailbox.status("Old").messages, 0)

    def test_delete_with_children_keeps_a_noselect_level(self) -> None:
        mailbox = self.bob()
        mailbox.create_folder("A/B")
        mailbox.append("A", MESSAGE)
        mailbox.append("A/B", MESSAGE)
        mailbox.delete_folder("A")
        folders = {f.name: f for f in mailbox.folders()}
        self.assertFalse(folders["A"].selectable)
        self.assertEqual(mailbox.usage().messages, 1)
        self.assertRaises(FolderNotAllowed, mailbox.select, "A")
        self.assertRaises(FolderNotAllowed, mailbox.append, "A", MESSAGE)
        self.assertRaises(FolderNotAllowed, mailbox.delete_folder, "A")
        mailbox.delete_folder("A/B")
        mailbox.delete_folder("A")
        self.assertEqual([f.name for f in mailbox.folders()], ["Drafts", INBOX, "Sent", "Trash"])

    def test_creating_a_noselect_level_makes_it_a_folder_again(self) -> None:
        mailbox = self.bob()
        mailbox.create_folder("A/B")
        mailbox.append("A", MESSAGE)
        old = mailbox.status("A").uidvalidity
        mailbox.delete_folder("A")
        mailbox.create_folder("A")
        self.assertGreater(mailbox.status("A").uidvalidity, old)
        self.assertEqual(mailbox.status("A").messages, 0)

    def test_inbox_cannot_be_deleted(self) -> None:
        mailbox = self.bob()
        self.assertRaises(FolderNotAllowed, mailbox.delete_folder, "inbox")
        self.assertRaises(NoSuchFolder, mailbox.delete_folder, "Nothing")

    def test_rename_moves_the_subtree_and_the_subscriptions(self) -> None:
        mailbox = self.bob()
        mailbox.create_folder("Work/Reports")
        mailbox.subscribe("Work/Reports")
        appended = mailbox.append("Work/Reports", MESSAGE, flags=[FLAGGED])
        validity = mailbox.status("Work/Reports").uidvalidity
        self.assertEqual(mailbox.rename_folder("Work", "Archive/2024/Work"), "Archive/2024/Work")
        names = [f.name for f in mailbox.folders()]
        self.assertIn("Archive/2024/Work/Reports", names)
        self.assertNotIn("Work", names)
        self.assertIn("Archive/2024/Work/Reports", mailbox.subscriptions())
        self.assertNotIn("Work/Reports", mailbox.subscriptions())
        status = mailbox.status("Archive/2024/Work/Reports")
        self.assertEqual((status.uidvalidity, status.messages), (validity, 1))
        self.assertEqual(mailbox.read_message("Archive/2024/Work/Reports", appended.uid), MESSAGE)
        path = self.folder_path(mailbox, "Archive/2024/Work/Reports")
        record = json.loads((path / FOLDER_FILE).read_text(encoding="utf-8"))
        self.assertEqual(record["name"], "Archive/2024/Work/Reports")

    def test_rename_refusals(self) -> None:
        mailbox = self.bob()
        mailbox.create_folder("A/B")
        self.assertRaises(FolderExists, mailbox.rename_folder, "A", "Sent")
        self.assertRaises(FolderExists, mailbox.rename_folder, "A", "INBOX")
        self.assertRaises(FolderNotAllowed, mailbox.rename_folder, "A", "A/B/C")
        self.assertRaises(FolderNotAllowed, mailbox.rename_folder, "A", "A")
        self.assertRaises(NoSuchFolder, mailbox.rename_folder, "Nothing", "Else")
        self.assertRaises(InvalidFolderName, mailbox.rename_folder, "A", "/bad")

    def test_renaming_inbox_moves_its_messages_and_leaves_it_empty(self) -> None:
        store = self.open_store()
        store.deliver(["bob@example.org"], MESSAGE)
        store.deliver(["bob@example.org"], MESSAGE + b"2")
        mailbox = store.mailbox("bob@example.org")
        mailbox.add_flags(INBOX, [2], [SEEN])
        self.assertEqual(mailbox.rename_folder(INBOX, "INBOX/Old"), "INBOX/Old")
        self.assertEqual(mailbox.status(INBOX).messages, 0)
        moved = mailbox.messages("INBOX/Old")
        self.assertEqual([m.flags for m in moved], [frozenset(), frozenset({SEEN})])
        self.assertEqual(mailbox.read_message("INBOX/Old", moved[1].uid), MESSAGE + b"2")

    def test_subscriptions_may_name_missing_folders(self) -> None:
        mailbox = self.bob()
        mailbox.subscribe("Not/There")
        mailbox.unsubscribe("Sent")
        mailbox.unsubscribe("Never")
        self.assertEqual(mailbox.subscriptions(), ["Drafts", INBOX, "Not/There", "Trash"])
        self.assertRaises(InvalidFolderName, mailbox.subscribe, "a%")


class MessageTests(StoreCase):
    def test_append_with_flags_and_date(self) -> None:
        mailbox = self.bob()
        date = datetime.datetime(2024, 3, 4, 5, 6, 7, tzinfo=ZONE)
        appended = mailbox.append("Drafts", MESSAGE, flags=["\\draft", "\\Seen", "$Label1"], internal_date=date)
        self.assertEqual((appended.folder, appended.uid), ("Drafts", 1))
        info = mailbox.message("Drafts", 1)
        self.assertEqual(info.flags, frozenset({"\\Draft", SEEN, "$Label1"}))
        self.assertEqual(info.internal_date, date)
        self.assertEqual(info.internal_date.utcoffset(), datetime.timedelta(hours=2))
        self.assertEqual(info.size, len(MESSAGE))
        (name,) = os.listdir(self.folder_path(mailbox, "Drafts") / "cur")
        self.assertTrue(name.endswith(":2,DS"), name)
        self.assertEqual(mailbox.append("Drafts", b"second").uid, 2)
        status = mailbox.status("Drafts")
        self.assertEqual((status.messages, status.recent, status.unseen, status.uidnext), (2, 2, 1, 3))
        self.assertEqual(status.size, len(MESSAGE) + 6)
        self.assertRaises(InvalidArgument, mailbox.append, "Drafts", b"x", internal_date=datetime.datetime(2024, 1, 1))
        self.assertRaises(InvalidFlag, mailbox.append, "Drafts", b"x", flags=["\\Recent"])
        with self.assertRaises(NoSuchFolder) as caught:
            mailbox.append("Missing", b"x")
        self.assertEqual(caught.exception.imap_code, "TRYCREATE")
        self.assertEqual(os.listdir(self.folder_path(mailbox, "Drafts") / "tmp"), [])

    def test_select_claims_recent_messages_once(self) -> None:
        store = self.open_store()
        store.deliver(["bob@example.org"], MESSAGE)
        store.deliver(["bob@example.org"], MESSAGE)
        mailbox = store.mailbox("bob@example.org")
        mailbox.add_flags(INBOX, [1], [SEEN])
        examined = mailbox.select(INBOX, readonly=True)
        self.assertEqual((examined.recent, examined.status.recent), (frozenset({1, 2}), 2))
        first = mailbox.select(INBOX)
        self.assertEqual(first.recent, frozenset({1, 2}))
        self.assertEqual((first.uids, first.first_unseen, first.readonly), ((1, 2), 2, False))
        self.assertEqual((first.status.messages, first.status.unseen, first.status.recent), (2, 1, 2))
        second = mailbox.select(INBOX)
        self.assertEqual((second.recent, second.status.recent), (frozenset(), 0))
        self.assertEqual(mailbox.status(INBOX).recent, 0)

    def test_message_bytes_and_missing_messages(self) -> None:
        mailbox = self.bob()
        mailbox.append(INBOX, MESSAGE)
        with mailbox.open_message(INBOX, 1) as handle:
            self.assertEqual(handle.read(4), MESSAGE[:4])
            mailbox.add_flags(INBOX, [1], [DELETED])
            self.assertEqual(mailbox.expunge(INBOX), [1])
            self.assertEqual(handle.read(), MESSAGE[4:])  # an open message outlives its expunge
        self.assertRaises(NoSuchMessage, mailbox.read_message, INBOX, 1)
        self.assertRaises(NoSuchMessage, mailbox.message, INBOX, 1)
        self.assertRaises(NoSuchFolder, mailbox.read_message, "Nowhere", 1)

    def test_flags_set_add_remove(self) -> None:
        mailbox = self.bob()
        for _ in range(3):
            mailbox.append(INBOX, MESSAGE)
        before = mailbox.status(INBOX).highest_modseq
        changed = mailbox.add_flags(INBOX, [1, 2, 99], ["\\seen", "$Work"])
        self.assertEqual([m.uid for m in changed], [1, 2])
        self.assertTrue(all(m.flags == {SEEN, "$Work"} for m in changed))
        self.assertEqual({m.modseq for m in changed}, {before + 1})
        again = mailbox.add_flags(INBOX, [1], [SEEN, "$work"])
        self.assertEqual(again[0].modseq, before + 1)  # nothing changed, no new modseq
        self.assertEqual(again[0].flags, {SEEN, "$Work"})
        removed = mailbox.remove_flags(INBOX, [1], ["$WORK", FLAGGED])
        self.assertEqual(removed[0].flags, {SEEN})
        replaced = mailbox.set_flags(INBOX, [2, 3], [FLAGGED, "Todo"])
        self.assertEqual([m.flags for m in replaced], [{FLAGGED, "Todo"}, {FLAGGED, "Todo"}])
        self.assertEqual(mailbox.status(INBOX).unseen, 2)
        self.assertEqual(mailbox.set_flags(INBOX, range(1, 4), [])[0].flags, frozenset())
        self.assertRaises(InvalidFlag, mailbox.add_flags, INBOX, [1], ["\\Recent"])

    def test_expunge_and_uid_expunge(self) -> None:
        mailbox = self.bob()
        for _ in range(4):
            mailbox.append(INBOX, MESSAGE)
        mailbox.add_flags(INBOX, [1, 2, 4], [DELETED])
        self.assertEqual(mailbox.expunge(INBOX, [2, 3, 4]), [2, 4])
        self.assertEqual(mailbox.uids(INBOX), [1, 3])
        self.assertEqual(mailbox.expunge(INBOX), [1])
        self.assertEqual(mailbox.expunge(INBOX), [])
        self.assertEqual(mailbox.uids(INBOX), [3])
        self.assertEqual(len(os.listdir(self.folder_path(mailbox, INBOX) / "cur")), 1)
        self.assertEqual(mailbox.usage().messages, 1)
        self.assertEqual(mailbox.append(INBOX, MESSAGE).uid, 5)  # UIDs are never reused

    def test_delete_messages_ignores_flags(self) -> None:
        mailbox = self.bob()
        for _ in range(3):
            mailbox.append(INBOX, MESSAGE)
        self.assertEqual(mailbox.delete_messages(INBOX, [1, 3, 7]), [1, 3])
        self.assertEqual(mailbox.uids(INBOX), [2])

    def test_copy_keeps_flags_and_dates_and_shares_the_bytes(self) -> None:
        mailbox = self.bob()
        date = datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC)
        mailbox.append(INBOX, MESSAGE, flags=[SEEN, "$Work"], internal_date=date)
        mailbox.append(INBOX, b"other")
        mailbox.create_folder("Keep")
        mailbox.append("Keep", b"already there")
        copied = mailbox.copy(INBOX, [2, 1, 42], "Keep")
        self.assertEqual((copied.source, copied.destination), ((1, 2), (2, 3)))
        self.assertEqual(copied.uidvalidity, mailbox.status("Keep").uidvalidity)
        info = mailbox.message("Keep", 2)
        self.assertEqual((info.flags, info.internal_date), ({SEEN, "$Work"}, date))
        self.assertEqual(mailbox.read_message("Keep", 3), b"other")
        self.assertEqual(mailbox.uids(INBOX), [1, 2])
        self.assertEqual(mailbox.usage().messages, 5)
        source = next((self.folder_path(mailbox, INBOX) / "cur").iterdir())
        self.assertEqual(source.stat().st_nlink, 2)
        with self.assertRaises(NoSuchFolder) as caught:
            mailbox.copy(INBOX, [1], "Missing")
        self.assertEqual(caught.exception.imap_code, "TRYCREATE")
        empty = mailbox.copy(INBOX, [77], "Keep")
        self.assertEqual((empty.source, empty.destination), ((), ()))

    def test_move(self) -> None:
        mailbox = self.bob()
        for number in range(3):
            mailbox.append(INBOX, MESSAGE + str(number).encode(), flags=[FLAGGED] if number else [])
        since = mailbox.status(INBOX).highest_modseq
        moved = mailbox.move(INBOX, [2, 3], "Trash")
        self.assertEqual((moved.source, moved.destination), ((2, 3), (1, 2)))
        self.assertEqual(mailbox.uids(INBOX), [1])
        self.assertEqual(mailbox.read_message("Trash", 2), MESSAGE + b"2")
        self.assertEqual(mailbox.message("Trash", 1).flags, {FLAGGED})
        self.assertEqual(mailbox.changes(INBOX, since).expunged, (2, 3))
        self.assertEqual(mailbox.usage().messages, 3)
        self.assertEqual(len(list((self.folder_path(mailbox, INBOX) / "cur").iterdir())), 1)
        same = mailbox.move("Trash", [1], "Trash")
        self.assertEqual(same.destination, (3,))
        self.assertEqual(mailbox.uids("Trash"), [2, 3])

    def test_search(self) -> None:
        mailbox = self.bob()
        dates = [
            datetime.datetime(2024, 5, 1, 23, 30, tzinfo=datetime.UTC),  # 2024-05-02 01:30 at UTC+2
            datetime.datetime(2024, 5, 2, 23, 30, tzinfo=ZONE),
            datetime.datetime(2024, 5, 3, 0, 30, tzinfo=ZONE),
        ]
        mailbox.append(INBOX, b"a" * 10, flags=[SEEN, "$Work"], internal_date=dates[0])
        mailbox.append(INBOX, b"b" * 100, flags=[FLAGGED, "$work"], internal_date=dates[1])
        mailbox.append(INBOX, b"c" * 1000, flags=[SEEN, FLAGGED], internal_date=dates[2])

        def search(**criteria: object) -> list[int]:
            return mailbox.search(INBOX, SearchQuery(**criteria))  # type: ignore[arg-type]

        self.assertEqual(search(), [1, 2, 3])
        self.assertEqual(search(flags=frozenset({SEEN})), [1, 3])
        self.assertEqual(search(not_flags=frozenset({"\\seen"})), [2])
        self.assertEqual(search(flags=frozenset({SEEN, FLAGGED})), [3])
        self.assertEqual(search(flags=frozenset({"$WORK"})), [1, 2])
        self.assertEqual(search(not_flags=frozenset({"$Work"})), [3])
        self.assertEqual(search(larger=10), [2, 3])
        self.assertEqual(search(smaller=1000), [1, 2])
        self.assertEqual(search(larger=10, smaller=1000), [2])
        self.assertEqual(search(on=datetime.date(2024, 5, 1)), [1])  # its own zone: UTC
        self.assertEqual(search(on=datetime.date(2024, 5, 2)), [2])
        self.assertEqual(search(since=datetime.date(2024, 5, 2)), [2, 3])
        self.assertEqual(search(before=datetime.date(2024, 5, 3)), [1, 2])
        self.assertEqual(search(uids=range(2, 10)), [2, 3])
        self.assertEqual(search(uids={3, 1}), [1, 3])
        self.assertEqual(search(uids=set(range(3, 2000))), [3])
        self.assertEqual(search(uids=[]), [])
        self.assertEqual(search(uids=range(5, 5)), [])
        modseq = mailbox.add_flags(INBOX, [2], [SEEN])[0].modseq
        self.assertEqual(search(modseq=modseq), [2])
        self.assertRaises(InvalidFlag, search, flags=frozenset({"\\Bogus"}))

    def test_many_uids_are_filtered_exactly(self) -> None:
        mailbox = self.bob()
        for _ in range(30):
            mailbox.append(INBOX, b"x")
        wanted = set(range(1, 31, 2)) | set(range(100, 1200))
        self.assertEqual([m.uid for m in mailbox.messages(INBOX, wanted)], list(range(1, 31, 2)))
        self.assertEqual(len(mailbox.add_flags(INBOX, wanted, [SEEN])), 15)

    def test_uidvalidity_guards_against_a_recreated_folder(self) -> None:
        mailbox = self.bob()
        mailbox.create_folder("Box")
        mailbox.append("Box", MESSAGE)
        old = mailbox.select("Box").status.uidvalidity
        mailbox.delete_folder("Box")
        mailbox.create_folder("Box")
        mailbox.append("Box", b"another message")
        self.assertRaises(UidValidityChanged, mailbox.read_message, "Box", 1, uidvalidity=old)
        self.assertRaises(UidValidityChanged, mailbox.add_flags, "Box", [1], [SEEN], uidvalidity=old)
        self.assertRaises(UidValidityChanged, mailbox.expunge, "Box", uidvalidity=old)
        self.assertRaises(UidValidityChanged, mailbox.copy, "Box", [1], INBOX, uidvalidity=old)
        current = mailbox.status("Box").uidvalidity
        self.assertEqual(mailbox.read_message("Box", 1, uidvalidity=current), b"another message")


class QuotaTests(StoreCase):
    def test_storage_quota(self) -> None:
        mailbox = self.bob(quota=Quota(bytes=1000))
        with self.assertRaises(MessageTooLarge) as too_large:
            mailbox.append(INBOX, b"x" * 1001)
        self.assertIsInstance(too_large.exception, PermanentError)
        self.assertEqual(too_large.exception.imap_code, "OVERQUOTA")
        mailbox.append(INBOX, b"x" * 600)
        with self.assertRaises(MailboxFull) as full:
            mailbox.append(INBOX, b"x" * 500)
        self.assertIsInstance(full.exception, TemporaryError)
        self.assertEqual(full.exception.enhanced_status, "4.2.2")
        self.assertRaises(MailboxFull, mailbox.append, INBOX, io.BytesIO(b"x" * 500))  # size learned by writing
        self.assertRaises(MailboxFull, mailbox.copy, INBOX, [1], "Trash")
        self.assertEqual(mailbox.usage().bytes, 600)
        self.assertEqual(os.listdir(self.folder_path(mailbox, INBOX) / "tmp"), [])
        self.assertEqual(len(os.listdir(self.folder_path(mailbox, INBOX) / "cur")), 1)
        mailbox.move(INBOX, [1], "Trash")  # a move needs no room
        mailbox.delete_messages("Trash", [1])
        self.assertEqual(mailbox.usage().bytes, 0)
        mailbox.append(INBOX, b"x" * 1000)

    def test_message_count_quota(self) -> None:
        mailbox = self.bob(quota=Quota(messages=2))
        mailbox.append(INBOX, b"1")
        mailbox.append("Sent", b"2")
        self.assertRaises(MailboxFull, mailbox.append, INBOX, b"3")
        self.assertRaises(MailboxFull, mailbox.check_quota, 1)
        self.assertEqual(mailbox.usage().limit_messages, 2)

    def test_delivery_quota_is_per_recipient(self) -> None:
        store = self.open_store(quota=Quota(bytes=len(MESSAGE) * 2))
        store.mailbox("alice@example.org").append(INBOX, MESSAGE * 2)
        self.assertRaises(MailboxFull, store.check_recipient, "alice@example.org", len(MESSAGE))
        self.assertRaises(MessageTooLarge, store.check_recipient, "bob@example.org", len(MESSAGE) * 3)
        report = store.deliver(["alice@example.org", "bob@example.org"], MESSAGE)
        self.assertEqual([d.address for d in report.delivered], ["bob@example.org"])
        self.assertEqual(
            [(r.address, r.temporary, r.enhanced_status) for r in report.refused],
            [("alice@example.org", True, "4.2.2")],
        )
        report = store.deliver(["bob@example.org"], io.BytesIO(MESSAGE * 3))
        self.assertEqual([(r.temporary, r.enhanced_status) for r in report.refused], [(False, "5.2.3")])
        self.assertEqual(store.mailbox("bob@example.org").uids(INBOX), [1])

    def test_quota_survives_restart(self) -> None:
        store = self.open_store(quota=Quota(bytes=100))
        store.mailbox("bob@example.org").append(INBOX, b"x" * 90)
        store = self.restart(store, quota=Quota(bytes=100))
        mailbox = store.mailbox("bob@example.org")
        self.assertEqual(mailbox.usage().bytes, 90)
        self.assertRaises(MailboxFull, mailbox.append, INBOX, b"x" * 20)


class RestartTests(StoreCase):
    def test_a_restart_keeps_folders_uids_flags_and_state(self) -> None:
        store = self.open_store()
        store.deliver(["bob@example.org"], MESSAGE)
        mailbox = store.mailbox("bob@example.org")
        date = datetime.datetime(2022, 2, 2, 2, 2, 2, tzinfo=ZONE)
        mailbox.append(INBOX, b"second", flags=[SEEN, "$Important"], internal_date=date)
        mailbox.append(INBOX, b"third")
        mailbox.add_flags(INBOX, [3], [DELETED])
        mailbox.expunge(INBOX)
        mailbox.create_folder("Projects/Q1")
        mailbox.copy(INBOX, [2], "Projects/Q1")
        mailbox.subscribe("Projects/Q1")
        mailbox.select(INBOX)
        before_folders = mailbox.folders()
        before = {f.name: (mailbox.status(f.name), mailbox.messages(f.name)) for f in before_folders if f.selectable}

        store = self.restart(store)
        mailbox = store.mailbox("bob@example.org")
        self.assertEqual(mailbox.folders(), before_folders)
        after = {f.name: (mailbox.status(f.name), mailbox.messages(f.name)) for f in mailbox.folders() if f.selectable}
        self.assertEqual(after, before)
        self.assertEqual(mailbox.read_message(INBOX, 1), MESSAGE)
        self.assertEqual(mailbox.message(INBOX, 2).internal_date, date)
        self.assertEqual(mailbox.status(INBOX).uidnext, 4)
        self.assertEqual(mailbox.status(INBOX).recent, 0)
        self.assertEqual(mailbox.append(INBOX, b"fourth").uid, 4)
        self.assertEqual(mailbox.changes(INBOX, 1).expunged, (3,))


class RecoveryTests(StoreCase):
    def test_recovery_reconciles_the_index_with_the_maildir(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        for number in range(3):
            mailbox.append(INBOX, b"message %d" % number)
        inbox = self.folder_path(mailbox, INBOX)
        since = mailbox.select(INBOX).status.highest_modseq
        store.close()
        (inbox / "tmp" / "123.half-written.host").write_bytes(b"half")
        (inbox / "new" / "1000.dropped.host").write_bytes(b"dropped in new")
        (inbox / "cur" / "1001.seen.host:2,FS").write_bytes(b"dropped in cur")
        (inbox / "cur" / ".hidden").write_bytes(b"ignored")
        (inbox / "cur" / "1002.link.host").symlink_to("/etc/passwd")
        os.utime(inbox / "new" / "1000.dropped.host", (1_700_000_000, 1_700_000_000))
        os.utime(inbox / "cur" / "1001.seen.host:2,FS", (1_700_000_100, 1_700_000_100))
        [victim] = [p for p in (inbox / "cur").iterdir() if p.read_bytes() == b"message 1"]
        victim.unlink()

        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        self.assertEqual(os.listdir(inbox / "tmp"), [])
        messages = mailbox.messages(INBOX)
        self.assertEqual([m.uid for m in messages], [1, 3, 4, 5])
        self.assertEqual(mailbox.read_message(INBOX, 4), b"dropped in new")
        self.assertEqual(messages[2].internal_date.timestamp(), 1_700_000_000)
        self.assertEqual(messages[3].flags, {SEEN, FLAGGED})
        self.assertEqual(mailbox.read_message(INBOX, 5), b"dropped in cur")
        self.assertEqual(mailbox.status(INBOX).recent, 1)  # the one in new/
        changes = mailbox.changes(INBOX, since)
        self.assertEqual(changes.expunged, (2,))
        self.assertEqual([m.uid for m in changes.new], [4, 5])
        self.assertEqual(mailbox.usage().messages, 4)
        self.assertEqual(stat.S_IMODE((inbox / "new" / "1000.dropped.host").stat().st_mode), 0o600)

    def test_messages_keep_their_uids_when_the_last_index_transactions_are_lost(self) -> None:
        # What a power failure can do with synchronous=NORMAL: the files are durable, the last rows not.
        store = self.open_store()
        store.deliver(["bob@example.org"], b"first")
        mailbox = store.mailbox("bob@example.org")
        mailbox.append(INBOX, b"second", flags=[SEEN])
        mailbox.delete_messages(INBOX, [1])
        store.deliver(["bob@example.org"], b"third")
        mailbox.append(INBOX, b"fourth", flags=[FLAGGED])
        mailbox.copy(INBOX, [2], "Trash")
        before = {uid: mailbox.read_message(INBOX, uid) for uid in mailbox.uids(INBOX)}
        self.assertEqual(sorted(before), [2, 3, 4])
        root = mailbox.root
        store.close()
        with sqlite3.connect(root / INDEX_FILE) as db:
            db.execute(
                "DELETE FROM messages WHERE uid >= 3 OR folder_id = (SELECT id FROM folders WHERE name = 'Trash')"
            )
            db.execute("UPDATE folders SET uidnext = CASE name WHEN 'INBOX' THEN 3 ELSE 1 END")
        mailbox = self.open_store().mailbox("bob@example.org")
        after = {uid: mailbox.read_message(INBOX, uid) for uid in mailbox.uids(INBOX)}
        self.assertEqual(after, before)
        self.assertEqual(mailbox.message(INBOX, 4).flags, {FLAGGED})  # from the name's :2, info
        self.assertEqual(mailbox.read_message("Trash", 1), b"second")
        self.assertEqual(mailbox.status(INBOX).uidnext, 5)
        self.assertEqual(mailbox.append(INBOX, b"fifth").uid, 5)

    def test_a_foreign_maildir_file_gets_a_new_uid(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        for number in range(3):
            mailbox.append(INBOX, b"%d" % number)
        inbox = self.folder_path(mailbox, INBOX)
        store.close()
        (inbox / "cur" / "99.restored.host,U=2:2,S").write_bytes(b"restored from a backup")
        mailbox = self.open_store().mailbox("bob@example.org")
        self.assertEqual(mailbox.read_message(INBOX, 2), b"1")  # UID 2 is never given to another message
        self.assertEqual(mailbox.read_message(INBOX, 4), b"restored from a backup")

    def test_an_interrupted_folder_deletion_is_finished(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        mailbox.create_folder("Doomed")
        mailbox.append("Doomed", MESSAGE)
        path = self.folder_path(mailbox, "Doomed")
        store.close()
        os.rename(path, path.with_name(".deleted-" + path.name))
        mailbox = self.open_store().mailbox("bob@example.org")
        self.assertNotIn("Doomed", [f.name for f in mailbox.folders()])
        self.assertFalse(path.with_name(".deleted-" + path.name).exists())
        self.assertEqual(mailbox.usage().messages, 0)

    def test_a_lost_index_is_rebuilt_from_the_maildirs(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        mailbox.create_folder("Projects/X")
        mailbox.append("Projects/X", b"project mail", flags=[SEEN])
        mailbox.append(INBOX, b"inbox mail")
        mailbox.delete_folder("Drafts")
        old = mailbox.status("Projects/X").uidvalidity
        root = mailbox.root
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{root / INDEX_FILE}{suffix}").unlink(missing_ok=True)
        mailbox = self.open_store().mailbox("bob@example.org")
        names = [f.name for f in mailbox.folders()]
        self.assertIn("Projects/X", names)
        self.assertIn("Drafts", names)  # a rebuilt index is a new mailbox: defaults come back
        self.assertGreater(mailbox.status("Projects/X").uidvalidity, old)
        self.assertEqual(mailbox.read_message("Projects/X", 1), b"project mail")
        self.assertEqual(mailbox.message("Projects/X", 1).flags, {SEEN})
        self.assertEqual(mailbox.read_message(INBOX, 1), b"inbox mail")
        self.assertEqual({f.name: f.special_use for f in mailbox.folders()}["Sent"], "\\Sent")

    def test_a_damaged_index_is_set_aside_and_rebuilt(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        mailbox.append(INBOX, b"keep me")
        root = mailbox.root
        store.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{root / INDEX_FILE}{suffix}").unlink(missing_ok=True)
        (root / INDEX_FILE).write_bytes(b"this is not a database" * 100)
        mailbox = self.open_store().mailbox("bob@example.org")
        self.assertEqual(mailbox.read_message(INBOX, 1), b"keep me")
        self.assertEqual(len(list(root.glob(INDEX_FILE + ".damaged-*"))), 1)

    def test_old_expunge_history_is_forgotten_and_said_so(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        mailbox.append(INBOX, b"1")
        mailbox.append(INBOX, b"2")
        since = mailbox.status(INBOX).highest_modseq
        mailbox.delete_messages(INBOX, [1])
        self.assertTrue(mailbox.changes(INBOX, since).complete)
        store.close()
        self.clock.now += EXPUNGE_HISTORY_SECONDS + 1
        mailbox = self.open_store().mailbox("bob@example.org")
        changes = mailbox.changes(INBOX, since)
        self.assertEqual((changes.expunged, changes.complete), ((), False))
        self.assertTrue(mailbox.changes(INBOX, changes.highest_modseq).complete)
        self.assertEqual(mailbox.uids(INBOX), [2])


class ChangeFeedTests(StoreCase):
    def test_changes_since_a_modseq(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        for _ in range(3):
            mailbox.append(INBOX, MESSAGE)
        session = mailbox.select(INBOX)
        since = session.status.highest_modseq
        self.assertTrue(mailbox.changes(INBOX, since).empty)
        store.deliver(["bob@example.org"], MESSAGE)
        mailbox.add_flags(INBOX, [1], [SEEN])
        mailbox.delete_messages(INBOX, [2])
        mailbox.append(INBOX, b"in and out")
        mailbox.delete_messages(INBOX, [5])
        changes = mailbox.changes(INBOX, since)
        self.assertEqual([m.uid for m in changes.new], [4])
        self.assertEqual([(m.uid, m.flags) for m in changes.changed], [(1, {SEEN})])
        self.assertEqual(changes.expunged, (2, 5))
        self.assertEqual(changes.highest_modseq, mailbox.status(INBOX).highest_modseq)
        self.assertEqual(changes.recent, frozenset())
        claimed = mailbox.changes(INBOX, since, claim_recent=True)
        self.assertEqual(claimed.recent, frozenset({4}))
        self.assertEqual(mailbox.changes(INBOX, since, claim_recent=True).recent, frozenset())
        self.assertTrue(mailbox.changes(INBOX, changes.highest_modseq).empty)

    def test_watchers_hear_of_every_commit(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        heard: list[Notice] = []
        cancel = mailbox.watch(heard.append)
        mailbox.watch(lambda notice: 1 / 0)  # type: ignore[func-returns-value]
        me = object()
        mailbox.append(INBOX, MESSAGE, origin=me)
        store.deliver(["bob@example.org"], MESSAGE)
        mailbox.add_flags(INBOX, [1], [SEEN], origin=me)
        mailbox.add_flags(INBOX, [1], [SEEN], origin=me)  # no change, no notice
        mailbox.move(INBOX, [2], "Trash")
        mailbox.create_folder("A")
        mailbox.rename_folder("A", "B")
        mailbox.delete_folder("B")
        self.assertEqual(
            [(n.folder, n.kind, n.origin is me) for n in heard],
            [
                (INBOX, "messages", True),
                (INBOX, "messages", False),
                (INBOX, "messages", True),
                ("Trash", "messages", False),
                (INBOX, "messages", False),
                ("B", "renamed", False),
                ("B", "deleted", False),
            ],
        )
        self.assertEqual(heard[5].old_name, "A")
        self.assertEqual(heard[2].highest_modseq, mailbox.message(INBOX, 1).modseq)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 7)
        cancel()
        cancel()
        mailbox.append(INBOX, MESSAGE)
        self.assertEqual(len(heard), 7)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_sessions_in_threads_see_each_others_changes(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        start = mailbox.select(INBOX).status.highest_modseq
        errors: list[BaseException] = []

        def session(number: int) -> None:
            try:
                for index in range(15):
                    body = b"session %d message %d" % (number, index)
                    appended = mailbox.append(INBOX, body)
                    mailbox.add_flags(INBOX, [appended.uid], [f"$S{number}"])
                    if index % 5 == 0:
                        store.deliver(["bob@example.org"], body + b" delivered")
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=session, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        changes = mailbox.changes(INBOX, start)
        self.assertEqual([m.uid for m in changes.new], list(range(1, 73)))
        bodies = {mailbox.read_message(INBOX, uid) for uid in range(1, 73)}
        expected = {b"session %d message %d" % (n, i) for n in range(4) for i in range(15)}
        expected |= {b"session %d message %d delivered" % (n, i) for n in range(4) for i in (0, 5, 10)}
        self.assertEqual(bodies, expected)
        tagged = [m for m in changes.new if any(flag.startswith("$S") for flag in m.flags)]
        self.assertEqual(len(tagged), 60)
        self.assertEqual(mailbox.usage().messages, 72)


class LargeMessageTests(StoreCase):
    def test_a_large_message_is_streamed_in_and_out(self) -> None:
        store = self.open_store()
        mailbox = store.mailbox("bob@example.org")
        block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
        size = 24 * 1024 * 1024 + 7
        source = Path(self.mktemp())
        with open(source, "wb") as handle:
            written = 0
            while written < size:
                piece = block[: size - written]
                handle.write(piece)
                written += len(piece)
        expected = hashlib.sha256(source.read_bytes()).hexdigest()
        with open(source, "rb") as handle:
            appended = mailbox.append(INBOX, handle)
        with open(source, "rb") as handle:
            report = store.deliver(["bob@example.org", "alice@example.org"], handle)
        self.assertTrue(report.all_delivered)
        self.assertEqual(mailbox.message(INBOX, appended.uid).size, size)
        for address, uid in [("bob@example.org", 1), ("bob@example.org", 2), ("alice@example.org", 1)]:
            digest = hashlib.sha256()
            with store.mailbox(address).open_message(INBOX, uid) as handle:
                while chunk := handle.read(1024 * 1024):
                    digest.update(chunk)
            self.assertEqual(digest.hexdigest(), expected)
        self.assertEqual(mailbox.usage().bytes, 2 * size)
