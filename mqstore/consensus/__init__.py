"""Replication: a sans-IO Raft core (``raft.RawNode``), its storage interface and quorum rules.

See ``mqstore.consensus.types`` for the interface and the driver loop.
"""
