"""``python -m kdcache.cli``: the same as the ``kdcache`` command."""

from kdcache.cli.main import main

main()
