"""The IMAP proxy's session state machine, alone: no sockets, no Twisted, no upstream."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from gatekeeper.imap_state import InvalidTransition, Phase, SessionState, UidValidityChanged, Updates
from gatekeeper.interfaces import SelectInfo


def selected(uids: list[int], *, exists: int | None = None, validity: int = 7) -> SessionState:
    state = SessionState()
    state.begin_select("INBOX")
    state.selected(
        SelectInfo(
            "INBOX", validity, (uids[-1] + 1) if uids else 1, uids, exists=len(uids) if exists is None else exists
        )
    )
    return state


class TransitionTests(SynchronousTestCase):
    def test_select_close_and_reselect(self) -> None:
        state = SessionState()
        self.assertIs(state.phase, Phase.AUTHENTICATED)
        state.begin_select("INBOX")
        self.assertIs(state.phase, Phase.SELECTING)
        self.assertFalse(state.is_selected)
        state.selected(SelectInfo("INBOX", 3, 5, [1, 2, 4], readonly=True, exists=3))
        self.assertTrue(state.is_selected)
        self.assertEqual((state.exists, state.uidvalidity, state.readonly), (3, 3, True))
        state.begin_select("Other")  # SELECT while selected leaves the old mailbox
        self.assertEqual(state.exists, 0)
        state.select_failed()
        self.assertIs(state.phase, Phase.AUTHENTICATED)
        self.assertIsNone(state.mailbox)

    def test_transitions_not_in_the_table_are_bugs(self) -> None:
        state = SessionState()
        with self.assertRaises(InvalidTransition):
            state.closed()
        with self.assertRaises(InvalidTransition):
            state.selected(SelectInfo("INBOX", 1, 1, []))
        with self.assertRaises(InvalidTransition):
            state.end_idle()
        state.begin_select("INBOX")
        with self.assertRaises(InvalidTransition):
            state.begin_idle()

    def test_idle_returns_to_where_it_started(self) -> None:
        state = selected([1, 2])
        state.begin_idle()
        self.assertIs(state.phase, Phase.IDLING)
        self.assertTrue(state.is_selected)
        state.end_idle()
        self.assertIs(state.phase, Phase.SELECTED)
        state.closed()
        state.begin_idle()
        state.end_idle()
        self.assertIs(state.phase, Phase.AUTHENTICATED)

    def test_lost_is_final(self) -> None:
        state = selected([1])
        state.lost()
        self.assertIs(state.phase, Phase.LOST)
        with self.assertRaises(InvalidTransition):
            state.begin_select("INBOX")


class ViewTests(SynchronousTestCase):
    def test_sequence_and_uid_sets(self) -> None:
        state = selected([3, 5, 9, 12])
        self.assertEqual(state.uids_for_sequence_set([(2, 3)]), [5, 9])
        self.assertEqual(state.uids_for_sequence_set([(3, None)]), [9, 12])
        self.assertEqual(state.uids_for_sequence_set([(None, None), (1, 1)]), [3, 12])
        self.assertEqual(state.uids_for_sequence_set([(4, 2), (40, 50)]), [5, 9, 12])
        self.assertEqual(state.uids_for_uid_set([(4, 10)]), [5, 9])
        self.assertEqual(state.uids_for_uid_set([(10, None)]), [12])
        self.assertEqual(state.uids_for_uid_set([(100, None)]), [12])  # "n:*" always includes the last
        self.assertEqual((state.uid_of(2), state.seq_of(9), state.seq_of(4), state.uid_of(5)), (5, 3, None, None))

    def test_expunges_wait_until_the_client_may_be_told(self) -> None:
        state = selected([10, 11, 12, 13])
        state.upstream_expunge(2)  # uid 11
        state.upstream_expunge(2)  # now uid 12
        # the client still numbers as before
        self.assertEqual(state.exists, 4)
        self.assertEqual(state.uid_of(3), 12)
        self.assertTrue(state.is_expunged(12))
        self.assertEqual(state.flush(allow_expunge=False), Updates())
        updates = state.flush()
        self.assertEqual(updates.expunged, (3, 2))  # descending: each number valid when sent
        self.assertEqual(list(state.client_uids), [10, 13])
        self.assertEqual(state.flush(), Updates())

    def test_new_mail_is_learned_then_announced(self) -> None:
        state = selected([1, 2])
        state.upstream_exists(4)
        self.assertEqual(state.unknown_uids, 2)
        self.assertFalse(state.flush())  # UIDs unknown: nothing to announce yet
        state.learn_uids([2, 7, 5])  # the "n:*" answer may repeat the last known message
        self.assertEqual(state.unknown_uids, 0)
        updates = state.flush()
        self.assertEqual(updates.exists, 4)
        self.assertEqual(list(state.client_uids), [1, 2, 5, 7])
        self.assertEqual(state.uidnext, 8)

    def test_fetch_of_the_next_message_learns_its_uid(self) -> None:
        state = selected([1, 2])
        state.upstream_exists(3)
        self.assertEqual(state.upstream_fetch(3, 9, ("\\Recent",)), 9)
        self.assertEqual(state.unknown_uids, 0)
        self.assertEqual(state.flush().exists, 3)

    def test_expunge_and_new_mail_together(self) -> None:
        state = selected([1, 2, 3])
        state.upstream_expunge(1)
        state.upstream_exists(3)
        state.learn_uids([8])
        updates = state.flush(allow_expunge=False)  # during FETCH: new mail yes, expunges no
        self.assertEqual((updates.expunged, updates.exists), ((), 4))
        self.assertEqual(list(state.client_uids), [1, 2, 3, 8])
        self.assertEqual(state.flush().expunged, (1,))
        self.assertEqual(list(state.client_uids), [2, 3, 8])

    def test_flag_changes_by_client_sequence_number(self) -> None:
        state = selected([4, 6, 8])
        state.upstream_expunge(1)  # upstream numbering shifts: uid 6 is upstream's 1
        state.upstream_fetch(1, None, ("\\Seen",))
        state.upstream_fetch(2, 8, ("\\Flagged",))
        updates = state.flush(allow_expunge=False)
        self.assertEqual(updates.flags, ((2, 6, ("\\Seen",)), (3, 8, ("\\Flagged",))))
        state.upstream_fetch(1, None, ("\\Deleted",))
        state.forget_flag_changes([6])
        self.assertEqual(state.flush(allow_expunge=False).flags, ())

    def test_no_flags_for_expunged_or_unknown_messages(self) -> None:
        state = selected([1, 2])
        state.upstream_fetch(2, 2, ("\\Seen",))
        state.upstream_expunge(2)
        self.assertEqual(state.flush().flags, ())

    def test_confused_upstream_is_counted_not_fatal(self) -> None:
        state = selected([1, 2])
        state.upstream_expunge(9)
        state.upstream_exists(1)  # EXISTS may not shrink
        self.assertIsNone(state.upstream_fetch(1, 99, None))  # UID disagrees with the view
        self.assertEqual(state.anomalies, 3)
        self.assertEqual(list(state.client_uids), [1, 2])

    def test_uidvalidity_change_voids_the_view(self) -> None:
        state = selected([1], validity=5)
        state.upstream_uidvalidity(5)
        with self.assertRaises(UidValidityChanged):
            state.upstream_uidvalidity(6)

    def test_views_share_memory_until_they_differ(self) -> None:
        state = selected(list(range(1, 10_001)))
        self.assertIs(state._client, state._upstream)
        state.upstream_expunge(1)
        self.assertIsNot(state._client, state._upstream)
        state.flush()
        self.assertIs(state._client, state._upstream)
        self.assertEqual(state.exists, 9999)

    def test_events_outside_a_selected_mailbox_are_ignored(self) -> None:
        state = SessionState()
        state.upstream_exists(5)
        state.upstream_expunge(1)
        state.learn_uids([1])
        self.assertEqual(state.flush(), Updates())
        state.begin_select("INBOX")
        state.upstream_exists(5)  # SELECT's own EXISTS: part of the answer, not news
        state.selected(SelectInfo("INBOX", 1, 6, [1, 2, 3, 4, 5], exists=5))
        self.assertEqual(state.unknown_uids, 0)

    def test_mail_arriving_during_select_is_learned(self) -> None:
        state = selected([1, 2], exists=3)
        self.assertEqual(state.unknown_uids, 1)
        state.learn_uids([3])
        self.assertEqual(state.flush().exists, 3)
