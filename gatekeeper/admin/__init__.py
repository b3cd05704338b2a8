"""Administration: the ``gatekeeper`` command line (and later the SSH console and a web page)."""
