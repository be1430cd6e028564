"""Brokers: how messages reach every worker (in-process, or through Redis)."""
