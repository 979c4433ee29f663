"""The swarm: virtual nodes that execute jobs, join, leave, crash, and gossip adverts.

Each node runs its models one job at a time from a FIFO of at most ``max_queue`` jobs, as
``rbee_p2p.engines.scheduler`` does, at the speed its hardware gives (``hardware.py``).

Two advert designs (``routing.mode``):

* ``flood`` -- a small swarm's node (``Membership.publish``, ``rbee_p2p/mesh/membership.py``)
  at any size: one GossipSub topic; every node publishes its full advert every
  ``advert_interval`` and 0.1 s after a load change (at most every 0.25 s); every node
  routes over all the adverts it holds;
* ``sample`` -- the proposed design: the topic carries only membership adverts (on join,
  on goodbye, and reminders paced by ``rbee_p2p.protocol.cadence``); load is asked for
  when routing (``requests.py``).

Observers (a few nodes, or all nodes of a small swarm) hold a real ``PeerTable`` fed with
real adverts through a real ``Verifier``; the others hold the equivalent state in compact
form (``requests.py`` explains how, and a test checks the two agree).
"""

from __future__ import annotations

import math
import random
from collections import deque

import numpy as np

from rbee_p2p.mesh.settings import advert_ttl_ms, liveness_s
from rbee_p2p.protocol.cadence import membership_interval_ms
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.protocol.errors import ProtocolError
from rbee_p2p.protocol.messages import CapabilityAdvert
from rbee_p2p.protocol.peers import PeerTable

from .engine import Loop
from .gossip import Flood, Mesh, frame_bytes
from .hardware import MODELS
from .metrics import Metrics
from .network import Network
from .scenario import Scenario
from .views import NODE
from .wire import SWARM, Wire
from .world import World

__all__ = ["Swarm", "GRACE_S"]

GRACE_S = 10.0  # a node that stops gives jobs in flight this long (as rbee-node does)
TICK_S = 0.25  # PeerTable ageing period of the node
BOOTSTRAP_ENTRY_BYTES = 60  # a joining node copies a neighbour's member list: id + model + speed


class Swarm:
    def __init__(self, sc: Scenario, world: World) -> None:
        from .requests import Requests  # the two halves of a node refer to each other

        self.sc, self.world = sc, world
        self.loop = Loop()
        n = world.count
        self.n = n
        seeds = np.random.SeedSequence([sc.seed, 7]).spawn(3)
        self.rng = random.Random(int(seeds[0].generate_state(1)[0]))
        self.np_rng = np.random.default_rng(seeds[1])
        self.net = Network(world.placement, sc.network.loss, sc.network.partitions,
                           random.Random(int(seeds[2].generate_state(1)[0])))
        self.mesh = Mesh(n, sc.gossip, self.net, random.Random(self.rng.getrandbits(64)))
        real = sc.sim.crypto == "real" or (sc.sim.crypto == "auto" and sc.nodes <= 200)
        self.wire = Wire(world.machines, world.placement, sc.seed, real)
        self.flood_mode = sc.routing.mode == "flood"
        self.m = Metrics(len(world.trace), n, sc.warmup_s, sc.duration_s)
        # node state (plain lists: scalar access is the hot path)
        self.alive = [False] * n
        self.leaving = [False] * n
        self.epoch = [0] * n
        self.model = [mc.model for mc in world.machines]
        self.speed = [mc.tokens_per_s for mc in world.machines]
        self.prefill = [mc.prefill_per_s for mc in world.machines]
        self.bad = world.malicious
        lie = sc.malicious.speed_lie
        self.claim_speed = [round(s * lie if b == "liar" else s, 1)
                            for s, b in zip(self.speed, self.bad)]
        self.max_queue = sc.routing.max_queue
        self.queue: list[deque[int]] = [deque() for _ in range(n)]
        self.running = [-1] * n
        self.run_start = [0.0] * n
        self.joined_at = [math.inf] * n
        self.seq = [0] * n
        self.advert_size = [0] * n
        # membership per model: who serves it (as far as the swarm announced)
        self.members: list[list[int]] = [[] for _ in MODELS]
        self._member_pos: list[dict[int, int]] = [{} for _ in MODELS]
        self.members_version = [0] * len(MODELS)
        self.pending_heard: dict[int, np.ndarray] = {}  # sample: when each node heard a join
        self.pending_version = 0
        self.join_np = np.array(world.join)
        # flood mode: each node's published adverts (times, adverts), newest last
        self.hist_t: list[list[float]] = [[] for _ in range(n)]
        self.hist_a: list[list[CapabilityAdvert]] = [[] for _ in range(n)]
        self.last_pub = [-1e9] * n
        self.pub_count = [0] * n
        self.change_pending = [False] * n
        self.change_t = [0.0] * n
        self._flood_cache: dict[int, tuple[int, Flood, float]] = {}
        self._window_msgs: deque[int] = deque([0] * sc.gossip.history_gossip)
        # observers: real PeerTables
        self.tables: dict[int, PeerTable] = {}
        self.tick_s = TICK_S
        self.verifiers: dict[int, Verifier] = {}
        self.requests = Requests(self)

    # -- running ------------------------------------------------------------------------

    def run(self) -> Metrics:
        sc, w = self.sc, self.world
        self._choose_observers()
        for i in range(w.initial):
            self._join(i, initial=True)
        for i in range(w.initial, w.count):
            self.loop.at(w.join[i], self._join, i, False)
        for i in range(w.count):
            if w.leave[i] != math.inf:
                self.loop.at(w.leave[i], self._leave, i)
        for index, p in enumerate(sc.network.partitions):
            self.loop.at(p.start_s, self._partition, index)
            self.loop.at(p.end_s, self._partition, None)
        self.loop.at(sc.gossip.heartbeat_s, self._heartbeat)
        if self.tables:
            self.loop.at(self.tick_s, self._tick_tables)
        self.loop.at(sc.warmup_s, self._sample_convergence)
        self.requests.start()
        limit = sc.duration_s + sc.sim.drain_s
        self.loop.run(limit, done=lambda: self.loop.now >= sc.duration_s and
                      self.requests.all_done())
        self.requests.finish_unfinished()
        return self.m

    def _choose_observers(self) -> None:
        w = self.world
        honest = [i for i in range(w.initial) if self.bad[i] is None]
        count = len(honest) if self.sc.nodes <= 64 else min(self.sc.sim.observers, len(honest))
        chosen = sorted(self.rng.sample(honest, count))
        # the node's limits (Membership: MeshConfig's, longer as reminders get sparser:
        # settings.liveness_s); it never changes the table's forget_after_ms
        suspect_s, dead_s = NODE.suspect_after_s, NODE.dead_after_s
        if not self.flood_mode:
            suspect_s, dead_s = liveness_s(NODE, self._interval_ms() / 1000)
            # ageing every 0.25 s is pointless (and costs 40k checks/s at 10k peers) when
            # limits are hours: age at 1/12 of the suspect limit
            self.tick_s = max(TICK_S, suspect_s / 12)
        suspect, dead = int(suspect_s * 1000), int(dead_s * 1000)
        self.wire.ttl_ms = advert_ttl_ms(dead_s)  # as Membership.sealed_advert seals them
        for node in chosen:
            self.tables[node] = PeerTable(self_id=self.wire.peer_ids[node], swarm=SWARM,
                                          suspect_after_ms=suspect, dead_after_ms=dead,
                                          max_peers=max(NODE.max_peers, 2 * w.count))
            self.verifiers[node] = Verifier()

    def _interval_ms(self) -> int:
        g = self.sc.gossip
        known = sum(len(m) for m in self.members) or self.world.initial
        return membership_interval_ms(known, budget_per_s=g.membership_budget_per_s,
                                      floor_ms=int(g.membership_floor_s * 1000))

    # -- membership -----------------------------------------------------------------------

    def _add_member(self, node: int) -> None:
        m = self.model[node]
        self._member_pos[m][node] = len(self.members[m])
        self.members[m].append(node)
        self.members_version[m] += 1

    def _drop_member(self, node: int) -> None:
        m = self.model[node]
        pos = self._member_pos[m].pop(node, None)
        if pos is None:
            return
        last = self.members[m].pop()
        if last != node:
            self.members[m][pos] = last
            self._member_pos[m][last] = pos
        self.members_version[m] += 1

    def _join(self, node: int, initial: bool) -> None:
        self.alive[node] = True
        self.advert_size[node] = self.wire.size(node, self.claim_speed[node])
        self.mesh.join(node)
        self._add_member(node)
        self._present_start(node)
        if initial and self.tables:
            advert = self.advert_now(node)
            data = self.wire.envelope(node, advert, self.loop.now_ms())
            for obs in self.tables:
                if obs != node:
                    self.table_apply(obs, node, advert, self.loop.now_ms(), data)
        if self.flood_mode:
            phase = self.rng.random() * self.sc.gossip.advert_interval_s if initial else 0.0
            self.loop.after(phase, self._publish, node, False)
            return
        if not initial:
            flood = self._spread(node, "membership")
            self.m.convergence["join"].append(flood.percentile(self.mesh.present))
            self.pending_heard[node] = self.loop.now + flood.arrival
            self.pending_version += 1
            self._count_bytes("bootstrap", node, BOOTSTRAP_ENTRY_BYTES * len(self.mesh.members()))
        known = self.world.initial if initial else len(self.mesh.members())
        interval = membership_interval_ms(known, budget_per_s=self.sc.gossip.membership_budget_per_s,
                                          floor_ms=int(self.sc.gossip.membership_floor_s * 1000))
        self.loop.after(self.rng.random() * interval / 1000.0, self._remind, node,
                        self.epoch[node])

    def _leave(self, node: int) -> None:
        """A scheduled leave: a crash vanishes at once; a graceful leave says goodbye,
        refuses new jobs and vanishes after the grace period."""
        if not self.alive[node]:
            return
        self._drop_member(node)
        if self.world.crash[node]:
            self._vanish(node)
            return
        self.leaving[node] = True
        if self.flood_mode:
            self._publish(node, False, serving=False)
        else:
            self._spread(node, "membership", serving=False)
        self.loop.after(GRACE_S, self._vanish, node)

    def _vanish(self, node: int) -> None:
        if not self.alive[node]:
            return
        now = self.loop.now
        self.alive[node] = False
        self.epoch[node] += 1
        self.mesh.leave(node)
        self._present_stop(node)
        jobs = list(self.queue[node])
        self.queue[node].clear()
        if self.running[node] >= 0:
            self.m.busy[node] += self.m.overlap(self.run_start[node], now)
            jobs.append(self.running[node])
            self.running[node] = -1
        self.requests.executor_gone(node, jobs)
        self.requests.entry_gone(node)

    def _present_start(self, node: int) -> None:
        self.joined_at[node] = self.loop.now

    def _present_stop(self, node: int) -> None:
        self.m.present[node] += self.m.overlap(self.joined_at[node], self.loop.now)
        self.joined_at[node] = math.inf

    def _partition(self, index: int | None) -> None:
        self.net.set_partition(index)
        self.mesh.version += 1  # link weights changed
        self._flood_cache.clear()
        self.requests.partition_changed()

    # -- executing jobs -----------------------------------------------------------------

    def load(self, node: int) -> tuple[int, int]:
        """(queue_depth, active_jobs) as the node would advertise them (liars: empty)."""
        if self.bad[node] == "liar":
            return 0, 0
        return len(self.queue[node]), 1 if self.running[node] >= 0 else 0

    def accept(self, node: int, rid: int) -> bool:
        """A job arrives; False if the node refuses it (full or stopping)."""
        if self.leaving[node] or len(self.queue[node]) >= self.max_queue:
            return False
        self.queue[node].append(rid)
        if self.running[node] < 0:
            self._start(node)
        self._load_changed(node)
        return True

    def _start(self, node: int) -> None:
        rid = self.queue[node].popleft()
        self.running[node] = rid
        self.run_start[node] = self.loop.now
        tr = self.world.trace
        prefill = tr.prompt[rid] / self.prefill[node]
        decode = tr.output[rid] / self.speed[node]
        self.requests.job_started(rid, node)
        self.loop.after(prefill + decode, self._finish, node, rid, self.epoch[node], decode)

    def _finish(self, node: int, rid: int, epoch: int, decode: float) -> None:
        if epoch != self.epoch[node]:
            return
        self.running[node] = -1
        self.m.busy[node] += self.m.overlap(self.run_start[node], self.loop.now)
        self.requests.job_finished(rid, node, decode)
        if self.queue[node]:
            self._start(node)
        self._load_changed(node)

    # -- adverts --------------------------------------------------------------------------

    def advert_now(self, node: int, serving: bool = True) -> CapabilityAdvert:
        self.seq[node] = max(self.seq[node] + 1, self.loop.now_ms())
        queue_depth, active = self.load(node)
        return self.wire.advert(node, self.seq[node], tokens_per_s=self.claim_speed[node],
                                queue_depth=queue_depth, active_jobs=active,
                                max_queue=self.max_queue, serving=serving)

    def _load_changed(self, node: int) -> None:
        if not self.flood_mode or self.change_pending[node] or not self.alive[node]:
            return
        g = self.sc.gossip
        self.change_pending[node] = True
        self.change_t[node] = self.loop.now
        when = max(self.loop.now + g.advert_debounce_s, self.last_pub[node] + g.advert_min_gap_s)
        self.loop.at(when, self._publish, node, True)

    def _periodic(self, node: int, count: int) -> None:
        if self.alive[node] and self.pub_count[node] == count and not self.leaving[node]:
            self._publish(node, False)

    def _publish(self, node: int, changed: bool, serving: bool = True) -> None:
        """Flood design: publish the full advert (load included) to everyone."""
        if not self.alive[node] or (self.leaving[node] and serving):
            return
        now = self.loop.now
        self.change_pending[node] = False
        self.last_pub[node] = now
        self.pub_count[node] += 1
        flood, p99 = self._cached_flood(node)
        advert = self.advert_now(node, serving)
        self._account(flood, self.advert_size[node], "adverts")
        if changed and self.m.in_window(now):
            self.m.convergence["load"].append(now - self.change_t[node] + p99)
        self._window_msgs[-1] += 1
        self.hist_t[node].append(now)
        self.hist_a[node].append(advert)
        if len(self.hist_t[node]) > 64:
            del self.hist_t[node][:32], self.hist_a[node][:32]
        self._deliver_to_tables(node, flood, advert)
        self.loop.after(self.sc.gossip.advert_interval_s, self._periodic, node,
                        self.pub_count[node])

    def _cached_flood(self, node: int) -> tuple[Flood, float]:
        """Flood design: a source's flood is computed once per mesh version (its
        retransmission draws included): thousands of adverts a second otherwise."""
        cached = self._flood_cache.get(node)
        if cached is None or cached[0] != self.mesh.version:
            flood = self.mesh.flood(node, self.advert_size[node], self.np_rng)
            cached = (self.mesh.version, flood, flood.percentile(self.mesh.present))
            self._flood_cache[node] = cached
        return cached[1], cached[2]

    def _spread(self, node: int, category: str, serving: bool = True) -> Flood:
        """Sample design: flood one membership advert (fresh flood each time)."""
        flood = self.mesh.flood(node, self.advert_size[node], self.np_rng)
        self._account(flood, self.advert_size[node], category)
        self._window_msgs[-1] += 1
        self._deliver_to_tables(node, flood, self.advert_now(node, serving))
        return flood

    def _remind(self, node: int, epoch: int) -> None:
        if not self.alive[node] or epoch != self.epoch[node] or self.leaving[node]:
            return
        flood = self._spread(node, "membership")
        self.m.convergence["reminder"].append(flood.percentile(self.mesh.present))
        heard = self.pending_heard.get(node)
        if heard is not None:  # a join some missed (partition): the reminder reaches them
            self.pending_heard[node] = np.minimum(heard, self.loop.now + flood.arrival)
            self.pending_version += 1
        self.loop.after(self._interval_ms() / 1000.0, self._remind, node, epoch)

    def _account(self, flood: Flood, data_len: int, category: str) -> None:
        """Bytes of one flood: into the time series always, into the totals (per node and
        by category) inside the measurement window."""
        size = frame_bytes(data_len)
        total = float(flood.received.sum()) * size
        self.m.add_bin("gossip_bytes", self.loop.now, total)
        if self.m.in_window(self.loop.now):
            self.m.gossip_in += flood.received * size
            self.m.gossip_out += flood.sent * size
            self.m.bytes[category] += total

    def _count_bytes(self, category: str, node: int, size: int) -> None:
        if self.m.in_window(self.loop.now):
            self.m.bytes[category] += size
            self.m.gossip_in[node] += size

    def _deliver_to_tables(self, node: int, flood: Flood, advert: CapabilityAdvert) -> None:
        if not self.tables:
            return
        now = self.loop.now
        sent_ms = self.loop.now_ms()
        data = self.wire.envelope(node, advert, sent_ms)
        for obs in self.tables:
            if obs != node and self.alive[obs]:
                delay = flood.arrival[obs]
                if delay != math.inf:
                    self.loop.at(now + float(delay), self._table_receive, obs, node, advert,
                                 data, sent_ms)

    def _table_receive(self, obs: int, sender: int, advert: CapabilityAdvert,
                       data: bytes | None, sent_ms: int) -> None:
        if self.alive[obs]:
            self.table_apply(obs, sender, advert, sent_ms, data)

    def table_apply(self, obs: int, sender: int, advert: CapabilityAdvert, sent_ms: int,
                    data: bytes | None = None) -> None:
        """An observer's real PeerTable takes a real (verified) advert; refusals are counted
        by the table itself, as on the node."""
        now_ms = self.loop.now_ms()
        table = self.tables[obs]
        try:
            verified = self.wire.deliver(sender, advert, data, now_ms, sent_ms,
                                         self.verifiers[obs])
            table.apply_advert(verified, now_ms)
        except ProtocolError as exc:
            if exc.reason == "replayed":
                table.count_invalid("replayed")

    def _tick_tables(self) -> None:
        now_ms = self.loop.now_ms()
        for obs, table in self.tables.items():
            if self.alive[obs]:
                table.tick(now_ms)
        self.loop.after(self.tick_s, self._tick_tables)

    # -- heartbeat, convergence -----------------------------------------------------------

    def _heartbeat(self) -> None:
        """GossipSub heartbeat: mesh repair, and IHAVE gossip of the recent message ids."""
        self.mesh.heartbeat()
        now = self.loop.now
        self._forget_heard_joins(now)
        window = sum(self._window_msgs)
        self._window_msgs.append(0)
        self._window_msgs.popleft()
        per_node = self.mesh.ihave_bytes(window)
        if per_node:
            present = self.mesh.present
            total = per_node * float(present.sum())
            self.m.add_bin("gossip_bytes", now, total)
            if self.m.in_window(now):
                self.m.gossip_in[present] += per_node
                self.m.gossip_out[present] += per_node
                self.m.bytes["ihave"] += total
        if self.mesh.control_bytes and self.m.in_window(now):
            self.m.bytes["graft_prune"] += self.mesh.control_bytes
        self.mesh.control_bytes = 0
        self.loop.after(self.sc.gossip.heartbeat_s, self._heartbeat)

    def _forget_heard_joins(self, now: float) -> None:
        """A join everybody present before it has heard needs no more tracking."""
        present = self.mesh.present
        for node, heard in list(self.pending_heard.items()):
            older = present & (self.join_np <= self.world.join[node])
            if bool(np.all(heard[older] <= now)):
                del self.pending_heard[node]

    def _sample_convergence(self) -> None:
        """Every 5 s: how long an advert from a random live node takes to reach 99% of the
        live nodes (what a new node's first advert, or any advert, takes)."""
        if self.loop.now > self.sc.duration_s:
            return
        members = self.mesh.members()
        if members:
            node = members[self.rng.randrange(len(members))]
            flood = self.mesh.flood(node, self.advert_size[node], self.np_rng)
            self.m.convergence["advert"].append(flood.percentile(self.mesh.present))
        self.loop.after(5.0, self._sample_convergence)

    def finish_presence(self) -> None:
        for node in range(self.n):
            if self.alive[node]:
                self._present_stop(node)
