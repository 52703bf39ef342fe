"""``python -m machinery.cli``: the same as the ``machinery`` command."""

from . import main

main()
