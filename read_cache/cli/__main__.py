"""`python -m read_cache.cli ...` is the same as the `read-cache` command."""

from read_cache.cli import main

main()
