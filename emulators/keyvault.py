"""Key Vault emulator (stub: to be implemented)."""

from __future__ import annotations


class KeyVaultEmulator:
    def routes(self):
        return []
