"""What a node learns about a peer from the jobs it sent there, and how routing then sees
that peer (no network: the mesh's table is fed a real verified advert)."""

import time
from types import SimpleNamespace

import samples

from rbee_p2p.engines.base import Completion
from rbee_p2p.mesh.service import Mesh, MeshConfig
from rbee_p2p.protocol.envelope import Verifier, seal
from rbee_p2p.routing import RequestFacts, Snapshot, decide, fastest

A, B = samples.key_a(), samples.key_b()  # A routes, B is the peer


def mesh_knowing_b(claimed_tps=150.5, queue_depth=0):
    mesh = Mesh(MeshConfig(), A, local=None, executor=None, verifier=Verifier())
    advertise(mesh, claimed_tps, queue_depth, seq=7)
    return mesh


def advertise(mesh, claimed_tps, queue_depth, seq):
    now = int(time.time() * 1000)
    advert = samples.advert(models=(samples.advert().models[0].__class__(
        name="smollm2", digest=bytes(32), modality="text", tokens_per_s=claimed_tps),),
        queue_depth=queue_depth, active_jobs=0, seq=seq)
    raw = seal(B, advert, now_ms=now)
    mesh.table.apply_advert(mesh.verifier.verify(raw, now), now)


def claim(mesh):
    """What B's advert claims as A chooses it (the job is judged against this)."""
    return mesh.view.claim(B.peer_id, "smollm2")


def finished_job(measured_tps, tokens=64, wait_s=0.05):
    start = 1000.0
    first = start + wait_s
    return SimpleNamespace(where=B.peer_id, completion=Completion(completion_tokens=tokens),
                           request=SimpleNamespace(model="smollm2", max_tokens=tokens),
                           started_at=start, first_at=first,
                           ended_at=first + (tokens - 1) / measured_tps)


def facts(mesh):
    (peer,) = mesh.peers()
    return peer


def test_an_honest_peer_keeps_its_standing():
    mesh = mesh_knowing_b()
    for _ in range(5):
        mesh.view._job_done(finished_job(measured_tps=150.0), claim(mesh))
    peer = facts(mesh)
    assert peer.reputation > 0.95 and peer.speed("smollm2") > 140


def test_a_job_is_judged_against_the_advert_the_peer_was_chosen_by():
    mesh = mesh_knowing_b(queue_depth=4)  # busy when chosen: 4 x 64 tokens to wait for
    for seq in range(8, 18, 2):
        chosen = claim(mesh)
        advertise(mesh, 150.5, queue_depth=0, seq=seq)  # idle again by the time it is done
        mesh.view._job_done(finished_job(measured_tps=150.0, wait_s=4 * 64 / 150.5), chosen)
        advertise(mesh, 150.5, queue_depth=4, seq=seq + 1)
    assert facts(mesh).reputation > 0.95  # it waited as long as it said it would


def test_a_peer_claiming_three_times_its_speed_sinks_and_loses_to_an_honest_one():
    liar = mesh_knowing_b(claimed_tps=300.0)
    for _ in range(4):
        liar.view._job_done(finished_job(measured_tps=100.0), claim(liar))
    peer = facts(liar)
    assert peer.reputation < 0.5 and peer.speed("smollm2") < 120
    honest = peer.__class__(id="honest", models=(peer.models[0].__class__(
        "smollm2", tokens_per_s=150.0),))
    decision = decide(fastest, RequestFacts(model="smollm2"), Snapshot(None, (peer, honest)))
    assert decision.candidates[0] == "honest"


def test_failures_and_refusals_count_against_a_peer():
    mesh = mesh_knowing_b()
    before = facts(mesh)
    mesh.view._suspect(B.peer_id)
    mesh.view._refused(B.peer_id)
    after = facts(mesh)
    assert after.reputation < before.reputation and after.latency_ms > before.latency_ms
