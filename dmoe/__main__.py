"""``python -m dmoe`` is the ``dmoe`` command."""

from dmoe.cli import main

main()
