"""Helpers for mqstore's tests and benchmarks, shipped with the package so an installed mqstore
can be tested: seeded email-like messages, crash-test child processes, fake clocks."""
