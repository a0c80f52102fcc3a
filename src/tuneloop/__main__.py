"""``python -m tuneloop``: the same as the ``tuneloop`` command."""

from tuneloop.app.cli import main

main()
