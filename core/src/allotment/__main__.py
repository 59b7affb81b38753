"""``python -m allotment``: the same as the ``allotment`` command."""

from ._cli import main

main()
