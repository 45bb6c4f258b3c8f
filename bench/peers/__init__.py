"""Adapters for the peers, one module per framework; each runs in the driver process
started with the interpreter of that framework's private environment."""
