"""Use cases, one per module. They take ports (Protocols) as arguments and import no SDK."""
