"""How a node paces its adverts and liveness limits with the swarm's size."""

import pytest

from rbee_p2p.mesh.service import MeshConfig, liveness_s, reminder_interval_s

CFG = MeshConfig()  # advert_interval 1 s, suspect 3 s, dead 8 s, large above 32, 0.5 a second


@pytest.mark.parametrize("known, interval", [
    (0, 1.0), (5, 1.0), (32, 1.0),  # small swarms: as configured, load in the adverts
    (33, 68.0), (999, 2000.0), (9_999, 20_000.0),  # the swarm sends ~0.5 reminders a second
])
def test_reminders_keep_the_swarm_within_its_budget(known, interval):
    assert reminder_interval_s(CFG, known) == pytest.approx(interval)
    swarm_rate = (known + 1) / reminder_interval_s(CFG, known)
    assert swarm_rate <= CFG.advert_budget + 1e-9 or known <= CFG.probe_above


@pytest.mark.parametrize("interval, expected", [
    (1.0, (3.0, 8.0)),  # the configured limits hold in a small swarm
    (200.0, (600.0, 1200.0)),  # three / six missed reminders
])
def test_liveness_follows_the_pace(interval, expected):
    assert liveness_s(CFG, interval) == pytest.approx(expected)
