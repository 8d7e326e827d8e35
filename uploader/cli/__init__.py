"""The `nix-cache-uploader` command line: thin wrappers around the engine.

One module per command group; `_common` holds the group, the exit codes and
the option blocks they share.  Importing the modules registers their commands.
"""

from uploader.cli import daemon, gc, install, keys, lifecycle, push, quorum
from uploader.cli._common import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, main

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_TIMEOUT", "EXIT_USAGE", "main"]

# The command modules register themselves with `main` when imported.
del daemon, gc, install, keys, lifecycle, push, quorum
