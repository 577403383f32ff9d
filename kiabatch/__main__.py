"""``python -m kiabatch`` is the ``kiabatch`` command."""

from .cli import main

main()
