"""What peers can make us log is said at most once a minute a kind (rbee_p2p/logs.py)."""

import logging

from rbee_p2p.logs import OncePerMinute, quiet_repeats


def test_one_record_a_kind_a_minute_then_the_count():
    now = [0.0]
    logger = logging.getLogger("test.once")
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.addFilter(OncePerMinute(clock=lambda: now[0]))
    try:
        for i in range(50):  # a join: GossipSub warns for every message over its limit
            logger.warning("Rate limit exceeded for peer %s on topic %s", f"p{i}", "adverts")
        logger.warning("another kind %s", 1)
        now[0] = 61.0
        logger.warning("Rate limit exceeded for peer %s on topic %s", "p50", "adverts")
    finally:
        logger.removeHandler(handler)
    assert records == ["Rate limit exceeded for peer p0 on topic adverts", "another kind 1",
                       "Rate limit exceeded for peer p50 on topic adverts (49 more like it in "
                       "the last 60 s)"]


def test_the_mesh_quiets_gossipsub_once():
    first, again = quiet_repeats(), quiet_repeats()
    assert first is again
    assert logging.getLogger("libp2p.pubsub.gossipsub").filters.count(first) == 1
