"""Helpers the test packages share: service settings, servers and workers in threads or processes, a webhook receiver."""
