"""The mesh I/O: libp2p host, discovery (mDNS, DHT, static), gossip and forwarding streams."""
