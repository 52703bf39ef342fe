"""The tests' shared fixtures live in ``support.fixtures`` (loaded here as a plugin), so that every
test directory (unit, contract, drivers, interop, e2e) sees the same ones; the local cloud
servers (moto, DynamoDB Local, the Pub/Sub emulator) in ``support.cloud``."""

pytest_plugins = ["support.fixtures", "support.cloud", "support.redis_topologies", "support.memcached"]
