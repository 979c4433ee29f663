import itertools

import pytest
import samples

from rbee_p2p.protocol.envelope import Verifier, seal
from rbee_p2p.protocol.errors import Misdirected
from rbee_p2p.protocol.peers import TRANSITIONS, PeerState, PeerTable, Stale

A, B = samples.key_a(), samples.key_b()
NOW = samples.NOW
S = PeerState


def verified(key=B, **changes):
    return Verifier().verify(seal(key, samples.advert(**changes), now_ms=NOW), NOW)


def table():
    return PeerTable(self_id=A.peer_id, swarm="default", suspect_after_ms=3000,
                     dead_after_ms=8000, forget_after_ms=60000)


def test_join_update_and_stale():
    t = table()
    entry = t.apply_advert(verified(seq=5), NOW)
    assert entry.state is S.ALIVE and t.alive() == [entry]
    t.apply_advert(verified(seq=6, queue_depth=3), NOW + 10)
    assert t.peers[B.peer_id].advert.queue_depth == 3
    for seq in (6, 2):
        with pytest.raises(Stale):
            t.apply_advert(verified(seq=seq), NOW + 20)
    assert t.counters == {"accepted": 2, "joined": 1, "rejected_stale": 2}


def test_other_swarm_and_own_adverts_are_refused():
    t = table()
    with pytest.raises(Misdirected):
        t.apply_advert(verified(swarm="other"), NOW)
    with pytest.raises(Misdirected):
        t.apply_advert(verified(key=A), NOW)
    assert not t.peers and t.counters["rejected_misdirected"] == 2


def test_ageing_alive_suspect_dead_forgotten():
    t = table()
    t.apply_advert(verified(seq=1), NOW)
    assert t.tick(NOW + 3000) == []
    assert t.tick(NOW + 3001) == [(B.peer_id, S.ALIVE, S.SUSPECT)]
    assert t.alive() == []
    assert t.tick(NOW + 8001) == [(B.peer_id, S.SUSPECT, S.DEAD)]
    assert t.tick(NOW + 60_001) == [(B.peer_id, S.DEAD, None)]
    assert not t.peers


def test_a_long_silence_goes_straight_to_dead():
    t = table()
    t.apply_advert(verified(seq=1), NOW)
    assert t.tick(NOW + 9000) == [(B.peer_id, S.ALIVE, S.DEAD)]


def test_failure_suspects_and_a_fresh_advert_revives():
    t = table()
    t.apply_advert(verified(seq=1), NOW)
    t.report_failure(B.peer_id, NOW + 1)
    assert t.peers[B.peer_id].state is S.SUSPECT and t.alive() == []
    t.apply_advert(verified(seq=2), NOW + 2)
    assert t.peers[B.peer_id].state is S.ALIVE


def test_transition_table_is_total_for_events_that_can_happen():
    for state, event in itertools.product(S, ["advert", "failure"]):
        assert (state, event) in TRANSITIONS


def test_a_full_table_makes_room_only_by_forgetting_a_dead_peer():
    from rbee_p2p.protocol.identity import NodeKey

    forgotten = []
    t = table()
    t.max_peers, t.on_forget = 1, forgotten.append
    t.apply_advert(verified(seq=1), NOW)
    C = NodeKey.from_seed(bytes(range(32)))
    with pytest.raises(Misdirected, match="full"):  # B is alive: it keeps its place
        t.apply_advert(verified(key=C), NOW + 10)
    t.tick(NOW + 9000)  # B is dead now
    t.apply_advert(verified(key=C), NOW + 9000)
    assert list(t.peers) == [C.peer_id] and forgotten == [B.peer_id]
    assert t.counters["evicted"] == 1


def test_the_forget_callback_hears_of_every_forgotten_peer():
    forgotten = []
    t = table()
    t.on_forget = forgotten.append
    t.apply_advert(verified(seq=1), NOW)
    t.tick(NOW + 9000)
    t.tick(NOW + 70_000)
    assert forgotten == [B.peer_id] and not t.peers
