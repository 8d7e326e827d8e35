"""The errors the uploader raises.

    UploaderError                 every error this package raises on purpose
    ├── ConfigError               bad flag, config file, store URL or option
    │   └── KeyFileError          unreadable, malformed or too-open key file
    ├── StoreError                the local Nix could not answer
    │   └── InvalidPathError      not a store path, or not valid in the store
    ├── NarError                  the file tree cannot be serialised as a NAR
    ├── VerificationError         streamed NarHash/NarSize differ from the Nix DB
    ├── TargetError               the binary cache refused or failed a request
    │   └── TransientTargetError  worth retrying later (network, 5xx, throttling)
    │       └── CredentialsError  no AWS credentials, or rejected ones (may be fixed later)
    ├── SpoolError                a spool entry is malformed (goes to quarantine)
    │   └── IncompleteEntryError  an entry still being written (left alone for now)
    └── InstallError              a step of `install`/`uninstall` failed

Transient errors are the only ones the daemon retries; everything else is
permanent for the input that caused it.  Errors about one store path carry it
in ``.store_path``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CredentialsError",
    "IncompleteEntryError",
    "InstallError",
    "InvalidPathError",
    "KeyFileError",
    "NarError",
    "NoBucketError",
    "SpoolError",
    "StoreError",
    "TargetError",
    "TransientTargetError",
    "UploaderError",
    "VerificationError",
]


class UploaderError(Exception):
    """Base of every error raised on purpose by nix-cache-uploader."""

    def __init__(self, message: str, *, store_path: str | None = None) -> None:
        super().__init__(message)
        self.store_path = store_path


class ConfigError(UploaderError):
    """A flag, config file, store URL or option is wrong."""


class KeyFileError(ConfigError):
    """A key file is unreadable, malformed or accessible to users besides its own."""


class StoreError(UploaderError):
    """The local Nix store could not answer a query."""


class InvalidPathError(StoreError):
    """A path is not a store path or is not valid in the store."""


class NarError(UploaderError):
    """A file tree cannot be serialised as a NAR (unsupported file type...)."""


class VerificationError(UploaderError):
    """The NAR streamed from disk does not match what the Nix database registered."""


class TargetError(UploaderError):
    """The binary cache refused a request."""


class NoBucketError(TargetError):
    """The bucket does not exist (an uploader has it create nix-cache-info and
    the layout again, should it come back)."""


class TransientTargetError(TargetError):
    """The binary cache failed in a way that is worth retrying later.

    ``retry_after`` is the server's Retry-After, in seconds, when it sent one.
    """

    def __init__(
        self, message: str, *, store_path: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, store_path=store_path)
        self.retry_after = retry_after


class CredentialsError(TransientTargetError):
    """No credentials for the cache, or the cache rejected them.

    Transient for the daemon (an instance role or a filled-in environment
    file can fix it without a restart); `push` and the other one-shot
    commands report it in one line."""


class SpoolError(UploaderError):
    """A spool entry is malformed; it is quarantined with this message as reason."""


class IncompleteEntryError(SpoolError):
    """A spool entry lacks its end line: its writer may still be at work.

    Not a reason to quarantine it, until it stays so for a long while.
    """


class InstallError(UploaderError):
    """A step of `install` or `uninstall` (useradd, systemctl, a file) failed."""
