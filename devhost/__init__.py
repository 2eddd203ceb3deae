"""Development host: runs the local stack (Azurite now; emulators and the function runner later)."""
