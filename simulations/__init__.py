"""A discrete-event simulator of rbee swarms at internet scale.

It drives the real ``rbee_p2p.protocol`` objects (adverts, peer tables, envelopes) and the
real ``rbee_p2p.routing`` code with thousands of virtual nodes in virtual time.  Run it
with ``python -m simulations run simulations/scenarios/steady.toml``; see README.md.
"""
