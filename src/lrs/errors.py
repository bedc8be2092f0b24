"""One exception type for every user-facing failure, so the CLI can print one clear line and exit non-zero."""


class LRSError(Exception):
    """A problem the user can fix (bad name, bad file, bad data); the message says what and how."""
