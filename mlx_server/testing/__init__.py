"""Helpers for tests and for users' own tests: a real server process, tiny models, fakes."""
