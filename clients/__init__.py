"""Azure SDK (and local) implementations of the handlers' ports. SDK errors are translated here, once."""
