"""Simulated field hardware speaking the real protocols over real transports.

Each stub runs as its own process (``python -m firmware_stubs.<stub>``), prints one JSON line when it
is ready, and has a loopback HTTP control interface for tests, benchmarks and the demo. Stubs are
independent implementations of the devices' documented maps: they never import ``devices``,
``gateway`` or ``portal``.
"""
