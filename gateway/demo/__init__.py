"""`gatehouse demo`: the whole estate on one machine, with simulated hardware.

Every part runs as its own process, as in production: a Mosquitto broker (unless one is given), the perimeter
panel, a Waveshare IO board with a beam, three door controllers (one bus) with their QR readers (one RS-485
line), two indoor panels on a Contact ID line, the district's grid platform (a stub the portal reports up to), the
portal and the gateway. The estate 阳光花园 is seeded through the portal's own import and pages (buildings, houses,
residents, an owner with a household, the doors, a site map, an elder living alone under care, a patrol route of
checkpoints placed on the map), and scripted life (:mod:`gateway.demo.life`) fills the access log and the board.
All files live under ``--data``; a second run carries on with the same data.

Modules: ``estate`` (the data and the two config files), ``people`` (the office, the guard and the owner at
the portal over HTTP), ``life`` (the scripted acts), ``banner`` (what is printed), ``proc`` (the child-process
runner), ``run`` (start-up and shut-down).
"""

from gateway.demo.proc import Proc
from gateway.demo.run import run_demo

__all__ = ["Proc", "run_demo"]
