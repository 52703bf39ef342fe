"""The tests' shared fixtures live in ``support.fixtures`` (loaded here as a plugin), so that every
test directory (unit, contract, drivers, interop, e2e) sees the same ones."""

pytest_plugins = ["support.fixtures", "support.redis_topologies", "support.memcached"]
