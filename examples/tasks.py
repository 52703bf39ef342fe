"""The seed's example tasks.

Start a worker on them from the repository root::

    machinery worker -A examples.tasks:server

The broker and backend come from the environment (``BROKER=redis://localhost:6379/0``...),
or are the SQLite file machinery.db in the current directory when it sets nothing.
"""

from machinery import Config, Server

server = Server(Config.from_env())


@server.task
def add(*args: int) -> int:
    """Return the sum of the arguments."""
    return sum(args)


@server.task
def multiply(*args: int) -> int:
    """Return the product of the arguments."""
    product = 1
    for arg in args:
        product *= arg
    return product
