"""Fault tests: services killed with SIGKILL, the broker restarted, faulty plugins."""
