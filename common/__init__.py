"""Process plumbing shared by the gateway and the portal programs: systemd notification, the strict YAML
config-file convention, stopping tasks for good, the MQTT client. Nothing of the estate's domain lives here, and
this package imports nothing of ``gateway``, ``portal`` or ``devices``; both programs may import it, as they may import
``gateway.wire``.
"""
