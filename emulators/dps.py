"""DPS emulator (stub: to be implemented)."""

from __future__ import annotations


class DpsInstance:
    def __init__(self, name, id_scope, shared_access_key, hub, max_groups=100):
        self.name = name
        self.id_scope = id_scope
        self.shared_access_key = shared_access_key
        self.hub = hub
        self.max_groups = max_groups
        self.endpoint = ""

    def routes(self):
        return []


class DpsDeviceEndpoint:
    def __init__(self, instances):
        self.instances = instances

    def routes(self):
        return []
