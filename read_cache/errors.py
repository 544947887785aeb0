"""The one exception type a user should ever see from read-cache.

A `ReadCacheError` carries a one-line message that names the problem and the fix; the CLI prints it
as `error: ...` and exits with status 2. Anything else escaping is a bug.
"""


class ReadCacheError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class CacheCorruptError(ReadCacheError):
    """A chunk of the store failed its checksum or could not be decoded."""
