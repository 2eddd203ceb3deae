"""IoT Hub registry emulator (stub: to be implemented)."""

from __future__ import annotations


class IotHubEmulator:
    def __init__(self, shared_access_key: str):
        self.shared_access_key = shared_access_key
        self.hostname = ""

    def routes(self):
        return []
