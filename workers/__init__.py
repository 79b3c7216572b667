"""The per-device process: loads its slice of a model and runs rank-local forwards."""
