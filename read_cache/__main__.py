"""`python -m read_cache ...` is the same as the `read-cache` command."""

from read_cache.cli import main

main()
