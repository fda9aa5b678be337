"""The installer's tooling: the ``gatehouse`` subcommands other than ``gateway run`` (:mod:`.cli`),
provisioning (:mod:`.provision`), live checks and the walk test (:mod:`.commissioning`), the bus scan
(:mod:`.scan`), and a Mosquitto for tests and the demo (:mod:`.broker`).

The daemon never imports this package (tests/test_tooling_boundary.py checks it); this package may import
the daemon's modules (config, alarms, bus specs).
"""
