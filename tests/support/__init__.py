"""Test support: service checks, waiting, running workers, recorders, and one harness per driver."""
