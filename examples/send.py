"""Send add(1, 1) and multiply(2, 3) and print their results.

With a worker running (``machinery worker -A examples.tasks:server``), run from the
repository root::

    python -m examples.send
"""

from examples.tasks import add, multiply

if __name__ == "__main__":
    sum_result = add.send(1, 1)
    product_result = multiply.send(2, 3)
    print("add(1, 1) =", sum_result.get(timeout=10))
    print("multiply(2, 3) =", product_result.get(timeout=10))
