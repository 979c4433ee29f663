"""Requests: from arrival at an entry node to exactly one outcome.

A request enters at a node (a user's own node), which plans where to run it:

* ``flood`` design: the places are this node and every peer whose advert it holds, alive or
  suspect, as ``PeerView.peers`` (``rbee_p2p/mesh/peers.py``) offers them (an advert's age
  is exact: it was published at a known time and reached this node over the mesh); the
  policy ranks them all;
* ``sample`` design: what ``PeerView.candidates`` does, by the same functions
  (``rbee_p2p.routing.probing``): this node keeps a *pool* per model (``draw_pool``,
  weights ``probing.peer_weight``, redrawn when ``pool_due``), draws ``routing.probes`` of
  it per request (``draw_probes``), asks each for its current advert, decides once
  ``probing.decided`` (half answered) or after ``probe_wait_s`` (the node's
  ``probe_timeout_s``), and ranks itself and the peers ``probing.to_rank`` keeps.  As on
  the node, a peer's facts are ``routing.places.peer_facts`` of its advert: the speed and
  trust of this node's standing there, and as latency the expected cost of its failures
  plus the round trip this node's pings measured (``smoothed_rtt``, every
  ``ping_interval_s`` to each connected peer; ``rtt_latency = false`` leaves it out).

Then, like ``Dispatcher.start``, it tries the ranked places in order: a full queue answers
"busy" (next place), a vanished peer fails after the connect timeout (the peer becomes
suspect, next place); when the list is exhausted it plans again after a backoff, up to
``max_rounds``.  With ``admission = "deadline"`` the job carries ``probing.admit_by_ms`` of the
policy's estimate for the chosen place, and the executor refuses it when
``probing.refuses`` (its own estimate ends later: someone else's job got there first).  A crashed executor is noticed
``crash_detect_s`` later and a result cut off by a partition after ``stream_timeout_s``;
both retry; a request not done ``deadline_s`` after arrival fails.  Malicious peers: a
dropper accepts and never answers (the requester gives up after ``drop_timeout_s``), a
garbage peer answers at once with junk (a spot check catches it with ``detect_garbage``), a
liar claims ``speed_lie`` x its speed and an empty queue.  What the requester observes feeds
its reputation standings (``rbee_p2p.routing.reputation``: ``after_result`` with what
``PeerView._job_done`` passes, ``after_failure``, ``after_refusal``).

Non-observer nodes keep their view compactly: a dict of peers they saw fail (with the
states of ``PeerTable.TRANSITIONS``), the flood adverts by (publish time + mesh delay).
Observers use their real ``PeerTable``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rbee_p2p.protocol.messages import CapabilityAdvert
from rbee_p2p.protocol.peers import TRANSITIONS, PeerState
from rbee_p2p.routing import PeerFacts, RequestFacts
from rbee_p2p.routing.probing import admit_by_ms, draw_probes, quorum, refuses, to_rank
from rbee_p2p.routing.reputation import Standing, after_failure, after_refusal, after_result
from rbee_p2p.routing.sampling import peer_key

from . import policy
from .hardware import MODELS
from .policy import Place
from .views import Views

if TYPE_CHECKING:
    from .swarm import Swarm

__all__ = ["Requests", "PROBE_BYTES", "REPLY_OVERHEAD"]

PROBE_BYTES = 120  # a new stream: multistream-select + yamux + noise framing
REPLY_OVERHEAD = 60  # length prefix + yamux + noise around the advert envelope
ALIVE, SUSPECT, DEAD = PeerState.ALIVE, PeerState.SUSPECT, PeerState.DEAD


class Req:
    __slots__ = ("rid", "entry", "model", "round", "token", "ranked", "next", "replies",
                 "claims", "places", "target", "job_token", "arrived", "started", "sent",
                 "deadline", "chosen")

    def __init__(self, rid: int, entry: int, model: int) -> None:
        self.rid, self.entry, self.model = rid, entry, model
        self.round = 0
        self.token = 0  # bumped per attempt: events of older attempts are ignored
        self.ranked: list[int] = []
        self.next = 0
        self.replies: list[tuple[int, CapabilityAdvert, float, float]] = []
        self.claims: dict[int, tuple[float, int, int]] = {}  # node -> advert's speed, load
        self.places: dict[int, Place] = {}
        self.chosen: list[int] = []  # probed this round
        self.deadline: int | None = None  # admit_by_ms of the attempt under way
        self.target = -1
        self.job_token = -1
        self.arrived = 0.0  # when the job reached its executor
        self.started = 0.0
        self.sent = 0.0


class Requests(Views):
    def __init__(self, swarm: Swarm) -> None:
        s = self.s = swarm
        self.loop, self.net, self.m, self.tr = s.loop, s.net, s.m, s.world.trace
        self.r = s.sc.routing
        self.router = policy.Router(s.wire.peer_ids)
        self.active: dict[int, Req] = {}
        self.by_entry: list[dict[int, None]] = [{} for _ in range(s.n)]
        self.next_arrival = 0
        self.suspect: list[dict[int, tuple[PeerState, float]]] = [{} for _ in range(s.n)]
        self.standing: list[dict[int, Standing]] = [{} for _ in range(s.n)]
        self.keys = [peer_key(pid) for pid in s.wire.peer_ids]
        self.keys_np = np.array(self.keys, dtype=np.uint64)
        self.claim_np = np.array(s.claim_speed)
        self.pools: dict[tuple[int, int], tuple[int, list[int], set[int]]] = {}
        self.dists: dict[int, tuple[int, list[float]]] = {}
        # views.py: peer facts (c, state, standing) -> (advert, rtt, facts); membership
        # adverts of peers; per node, its connected peers' [last ping, smoothed rtt ms]
        self.facts_cache: dict[tuple[int, str, Standing | None],
                               tuple[CapabilityAdvert, float, PeerFacts]] = {}
        self.member_adverts: dict[int, CapabilityAdvert] = {}
        self.rtts: list[dict[int, list]] = [{} for _ in range(s.n)]
        self.model_names = [m.name for m in MODELS]

    # -- arrivals and outcomes ------------------------------------------------------------

    def start(self) -> None:
        if len(self.tr):
            self.loop.at(self.tr.time[0], self._arrive, 0)
        self.loop.at(10.0, self._expire)

    def _expire(self) -> None:
        """Every 10 s: requests past their deadline fail ('deadline'), as the requester's
        deadline on the node would end them (up to 10 s late here)."""
        limit = self.loop.now - self.r.deadline_s
        for req in [r for r in self.active.values() if self.tr.time[r.rid] <= limit]:
            self._end(req, False, "deadline")
        if not self.all_done() or self.loop.now < self.s.sc.duration_s:
            self.loop.after(10.0, self._expire)

    def all_done(self) -> bool:
        return self.next_arrival >= len(self.tr) and not self.active

    def _arrive(self, rid: int) -> None:
        self.next_arrival = rid + 1
        if rid + 1 < len(self.tr):
            self.loop.at(self.tr.time[rid + 1], self._arrive, rid + 1)
        entry = self.tr.entry[rid]
        req = Req(rid, entry, self.tr.model[rid])
        self.active[rid] = req
        self.by_entry[entry][rid] = None
        if not self.s.alive[entry] or self.s.leaving[entry]:
            self._end(req, False, "entry_left")
            return
        self._plan(req)

    def _end(self, req: Req, ok: bool, reason: str = "") -> None:
        self.m.end_request(req.rid, self.loop.now, ok, reason)
        self.active.pop(req.rid, None)
        self.by_entry[req.entry].pop(req.rid, None)
        req.token += 1

    def finish_unfinished(self) -> None:
        """After the drain limit: whatever is left ends as 'unfinished' (should be none)."""
        for req in list(self.active.values()):
            self._end(req, False, "unfinished")

    # -- planning -------------------------------------------------------------------------

    def _plan(self, req: Req) -> None:
        req.round += 1
        req.token += 1
        if self.s.flood_mode:
            self._rank_and_try(req, self._flood_places(req))
        else:
            self._probe(req)

    def _replan(self, req: Req, token: int) -> None:
        if token == req.token:
            self._plan(req)

    def _probe(self, req: Req) -> None:
        s, e, now, net = self.s, req.entry, self.loop.now, self.net
        pool, members = self._pool(e, req.model)
        candidates = [(c, self.keys[c], self._weight(e, c)) for c in pool]
        salt = peer_key(req.rid.to_bytes(8, "big") + bytes([req.round & 255]))
        chosen = draw_probes(salt, candidates, members.__contains__, self.r.probes)
        req.replies, req.chosen = [], chosen
        replies: list[tuple[float, float, int]] = []  # (answer back, probe there, peer)
        for c in chosen:
            if not s.alive[c] or not net.reachable(e, c):
                continue  # the node's probe fails: no answer, nothing else (PeerView._probe)
            self._connected(e, c)
            there = net.delay(e, c, PROBE_BYTES)
            back = net.delay(c, e, s.advert_size[c] + REPLY_OVERHEAD)
            replies.append((now + there + back, now + there, c))
            size = PROBE_BYTES + s.advert_size[c] + REPLY_OVERHEAD
            self.m.add_bin("probe_bytes", now, size)
            if self.m.in_window(now):
                self.m.bytes["probes"] += size
        # decide once probing.decided (a quorum answered), or at the probe timeout
        needed = quorum(len(chosen))
        replies.sort()
        decide = now + self.r.probe_wait_s
        if needed == 0:
            decide = now
        elif len(replies) >= needed:
            decide = min(decide, replies[needed - 1][0])
        for reply_at, there_at, c in replies:
            if reply_at > decide:
                break  # answers after the decision change nothing: not simulated
            self.loop.at(there_at, self._probe_read, req, req.token, c, reply_at)
        self.loop.at(decide, self._decide, req, req.token)

    def _probe_read(self, req: Req, token: int, c: int, reply_at: float) -> None:
        if token != req.token:
            return
        s = self.s
        if not s.alive[c] or not self.net.reachable(req.entry, c):
            return
        advert = s.advert_now(c, serving=not s.leaving[c])
        req.replies.append((c, advert, reply_at, self.loop.now))

    def _decide(self, req: Req, token: int) -> None:
        if token != req.token:
            return
        e, now = req.entry, self.loop.now
        places = self._local_place(req)
        answers = {c: (advert, reply_at, read_at)
                   for c, advert, reply_at, read_at in req.replies if reply_at <= now}
        for c in to_rank(req.chosen, answers):
            if c not in answers:  # nobody answered: rank what this node knew of them
                place = self._known_place(e, c)
                if place is not None:
                    places.append(place)
                continue
            advert, reply_at, read_at = answers[c]
            self._revive(e, c, advert, read_at)
            if not advert.models:
                continue
            places.append(self._place(e, c, advert, "alive", self._rtt_ms(e, c), cache=False))
            if self.m.in_window(now):
                self.m.staleness.append(now - read_at)
        self._rank_and_try(req, places)

    def _known_place(self, e: int, c: int) -> Place | None:
        """Peer c as node e knew it before probing: its table entry (observers) or its
        membership advert (no load in it)."""
        state = self._state(e, c)
        advert = None if state is None else self._held_advert(e, c)
        if advert is None or not advert.models:
            return None
        return self._place(e, c, advert, state, self._rtt_ms(e, c))

    # -- views: suspicion ---------------------------------------------------------------

    def _suspect(self, e: int, c: int) -> None:
        s = self.s
        if e in s.tables:
            s.tables[e].report_failure(s.wire.peer_ids[c], self.loop.now_ms())
            return
        state = self.suspect[e].get(c, (ALIVE, 0.0))[0]
        self.suspect[e][c] = (TRANSITIONS[(state, "failure")], self.loop.now)

    def _revive(self, e: int, c: int, advert: CapabilityAdvert, read_at: float) -> None:
        s = self.s
        if e in s.tables:
            sent_ms = s.loop.now_ms() - int((self.loop.now - read_at) * 1000)
            s.table_apply(e, c, advert, sent_ms)
        else:
            self.suspect[e].pop(c, None)  # TRANSITIONS[(any, "advert")] is ALIVE

    # -- trying places ------------------------------------------------------------------

    def _try(self, req: Req, index: int) -> None:
        s, e, tr = self.s, req.entry, self.tr
        while index < len(req.ranked):
            target = req.ranked[index]
            index += 1
            req.token += 1
            req.target, req.next = target, index
            self.m.tries[req.rid] += 1
            if self.m.first[req.rid] < 0:
                self.m.first[req.rid], self.m.first_time[req.rid] = target, self.loop.now
            if target == e:
                req.job_token, req.arrived, req.sent = req.token, self.loop.now, self.loop.now
                if s.accept(e, req.rid):
                    return
                continue
            req.sent = self.loop.now
            req.deadline = None
            if self.r.admission == "deadline":  # PeerView._admit_by
                name = self.model_names[req.model]
                req.deadline = admit_by_ms(
                    self.loop.now_ms(), req.places[target].facts,
                    RequestFacts(name, max_tokens=tr.max_tokens[req.rid]))
            if not s.alive[target] or not self.net.reachable(e, target):
                self.loop.after(self.r.connect_timeout_s, self._job_failed, req, req.token,
                                "unreachable")
                return
            self._connected(e, target)
            size = 4 * tr.prompt[req.rid] + 300
            self.loop.after(self.net.delay(e, target, size), self._job_arrive, req, req.token,
                            target)
            return
        if req.round >= self.r.max_rounds:
            self._end(req, False, "busy" if req.ranked else "no_place")
            return
        self.loop.after(self.r.backoff_s, self._replan, req, req.token)

    def _job_arrive(self, req: Req, token: int, node: int) -> None:
        if token != req.token:
            return
        s, e = self.s, req.entry
        if not s.alive[node] or not self.net.reachable(e, node):
            self.loop.after(self.r.connect_timeout_s, self._job_failed, req, token,
                            "unreachable")
            return
        kind = s.bad[node]
        if kind == "dropper":
            self.loop.at(req.sent + s.sc.malicious.drop_timeout_s, self._job_failed, req, token,
                         "dropped")
            return
        if kind == "garbage":
            back = self.net.delay(node, e, 4 * self.tr.output[req.rid] + 400)
            self.loop.after(0.05 + back, self._garbage, req, token, node)
            return
        req.job_token, req.arrived = token, self.loop.now
        if self.r.admission == "deadline" and kind is None and self._late(req, node):
            self.m.counters["refused_deadline"] += 1
            self.loop.after(self.net.owd(node, e), self._busy, req, token)
            return
        if not s.accept(node, req.rid):
            self.loop.after(self.net.owd(node, e), self._busy, req, token)

    def _late(self, req: Req, node: int) -> bool:
        """The executor's side of deadline admission (``probing.refuses``, as the node's
        executor checks ``admit_by_ms``): its own estimate on its true queue and measured
        speed ends after the request's deadline."""
        s = self.s
        name = self.model_names[req.model]
        own = self.router.local_facts(name, node, s.speed[node], len(s.queue[node]),
                                      1 if s.running[node] >= 0 else 0, s.max_queue,
                                      s.wire.jurisdiction[node])
        return refuses(self.loop.now_ms(), req.deadline, own,
                       RequestFacts(name, max_tokens=self.tr.max_tokens[req.rid]))

    def _busy(self, req: Req, token: int) -> None:
        if token != req.token:
            return
        if self.r.reputation and req.target != req.entry:
            st = self.standing[req.entry].get(req.target, Standing())
            self.standing[req.entry][req.target] = after_refusal(st)
        self._try(req, req.next)

    def _job_failed(self, req: Req, token: int, reason: str) -> None:
        if token != req.token:
            return
        e, target = req.entry, req.target
        self.m.retried += 1
        self.m.counters[f"failed_{reason}"] += 1
        if self.s.bad[target] is not None:
            self.m.malicious_failures[req.rid] += 1
        self._suspect(e, target)
        self._observe_failure(e, target)
        self._try(req, req.next)

    def _garbage(self, req: Req, token: int, node: int) -> None:
        if token != req.token:
            return
        self.m.malicious_failures[req.rid] += 1
        if self.s.rng.random() < self.s.sc.malicious.detect_garbage:
            self.m.retried += 1
            self.m.counters["failed_garbage_detected"] += 1
            self._observe_failure(req.entry, node)
            self._try(req, req.next)
            return
        self.m.garbage[req.rid] = True
        self.m.executor[req.rid] = node
        self._end(req, True)

    # -- executor callbacks (from swarm.py) -----------------------------------------------

    def job_started(self, rid: int, node: int) -> None:
        req = self.active.get(rid)
        if req is not None and req.target == node:
            req.started = self.loop.now

    def job_finished(self, rid: int, node: int, decode: float) -> None:
        req = self.active.get(rid)
        if req is None or req.target != node or req.job_token != req.token:
            return  # abandoned work (its requester gave up or left)
        if node == req.entry:
            self._complete(req, node, decode)
            return
        if not self.net.reachable(node, req.entry):
            self.loop.after(self.r.stream_timeout_s, self._job_failed, req, req.token, "cut")
            return
        back = self.net.delay(node, req.entry, 4 * self.tr.output[req.rid] + 400)
        self.loop.after(back, self._result, req, req.token, node, decode)

    def _result(self, req: Req, token: int, node: int, decode: float) -> None:
        if token == req.token:
            self._complete(req, node, decode)

    def _complete(self, req: Req, node: int, decode: float) -> None:
        self.m.executor[req.rid] = node
        self.m.dispatched[req.rid] = req.sent
        if self.r.reputation and node != req.entry:  # PeerView._job_done
            tr, rid = self.tr, req.rid
            claimed, queue_depth, active = req.claims.get(node, (0.0, 0, 0))
            first = (req.started + tr.prompt[rid] / self.s.prefill[node]
                     + self.net.owd(node, req.entry))
            st = self.standing[req.entry].get(node, Standing())
            self.standing[req.entry][node] = after_result(
                st, claimed_tokens_per_s=claimed, queue_depth=queue_depth, active_jobs=active,
                max_tokens=tr.max_tokens[rid], tokens=tr.output[rid], sent_s=req.sent,
                first_s=first, ended_s=first + decode)
        self._end(req, True)

    def _observe_failure(self, e: int, node: int) -> None:
        if self.r.reputation:
            st = self.standing[e].get(node, Standing())
            self.standing[e][node] = after_failure(st)

    def executor_gone(self, node: int, jobs: list[int]) -> None:
        """An executor vanished: requesters whose job was there notice shortly."""
        for rid in jobs:
            req = self.active.get(rid)
            if req is not None and req.target == node:
                delay = self.net.owd(node, req.entry) + self.r.crash_detect_s
                self.loop.after(delay, self._job_failed, req, req.token, "crashed")

    def entry_gone(self, node: int) -> None:
        """The entry node left: its user's requests in flight end there."""
        for rid in list(self.by_entry[node]):
            req = self.active.get(rid)
            if req is not None:
                self._end(req, False, "entry_left")

    def partition_changed(self) -> None:
        self.dists.clear()
