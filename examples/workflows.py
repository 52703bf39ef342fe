"""The seed's chain, group and chord, printed as they complete.

With a worker running (``machinery worker -A examples.tasks:server``), run from the
repository root::

    python -m examples.workflows
"""

from examples.tasks import add, multiply, server
from machinery import Chain, Chord, Group

if __name__ == "__main__":
    # multiply(4, add(5, 5, add(1, 1))): each step gets the previous step's result appended.
    chain = Chain(add.signature(1, 1), add.signature(5, 5), multiply.signature(4))
    print("chain  =", server.send_chain(chain).get(timeout=10))  # 48

    group = Group(add.signature(1, 1), add.signature(5, 5))
    print("group  =", [result.get(timeout=10) for result in server.send_group(group)])  # [2, 10]

    # multiply(2, 10): the members' results, in group order, go to the callback.
    chord = Chord(Group(add.signature(1, 1), add.signature(5, 5)), multiply.signature())
    print("chord  =", server.send_chord(chord).get(timeout=10))  # 20
