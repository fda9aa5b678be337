"""The Gatehouse gateway daemon: config, alarm engine, access decisions, local store, uplink, CLI."""

__version__ = "0.1.0"
