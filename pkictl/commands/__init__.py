"""pkictl's commands, one module per group: each ``register(commands)`` adds its parsers, next to the
functions they run (``name(cli, args) -> int``)."""
