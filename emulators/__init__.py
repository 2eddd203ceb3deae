"""Local HTTPS doubles of Key Vault, DPS (service API and device registration) and the IoT Hub registry.

They serve the REST subsets the real Azure SDK clients use, on loopback, with a CA generated at
start, so tests and the demo exercise the real SDK code paths. Development tooling, not deployed.
"""
