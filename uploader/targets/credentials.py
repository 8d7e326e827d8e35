"""AWS credentials that may appear after start, and what to say when there are none.

boto3 resolves credentials once, when a client is made; a client made with
none fails every request forever.  A service started at boot before its
instance role is attached, or before an operator fills in its `environment`
file, must instead pick them up when they appear.  So the session's
credential provider hands out a stand-in that asks the usual chain again on
each use until it finds something, then keeps what it found (which refreshes
itself, as instance-role credentials do).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import boto3
import botocore.exceptions
import botocore.session

from uploader._exceptions import ConfigError, CredentialsError

__all__ = [
    "ENVIRONMENT_FILE",
    "UNIT_ENVIRONMENT_FILE",
    "missing_credentials",
    "rejected_credentials",
    "service_reads_credentials_from",
    "session_for",
]

# Where `install` has the service read its credentials.
ENVIRONMENT_FILE = "/etc/nix-cache-uploader/environment"
_environment_file = ENVIRONMENT_FILE
# Set by the NixOS module's units: the environment file they read, or empty
# when they read none.  Their config file is in the Nix store, so the file
# beside it is no guide there.
UNIT_ENVIRONMENT_FILE = "NIX_CACHE_UPLOADER_ENVIRONMENT_FILE"
_NO_FILE = "services.nix-cache-uploader.environmentFile on NixOS"


def service_reads_credentials_from(path: str) -> None:
    """Name ``path`` in the messages on credentials (unless the unit names
    its own): `install --config` puts the service's environment file beside
    its config file."""
    global _environment_file
    _environment_file = path


def _service_file() -> str | None:
    """The environment file the service reads, None when it reads none."""
    named = os.environ.get(UNIT_ENVIRONMENT_FILE)
    if named is None:
        return _environment_file
    return named or None


# S3 error codes that mean "these credentials are not (or no longer) good".
REJECTED_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        # Not the credentials but the clock that signs with them: as
        # unusable until someone acts (rejected_credentials says what).
        "RequestTimeTooSkewed",
    }
)


class _DeferredCredentials:
    """Credentials looked up on first use, and again on each use until found."""

    def __init__(self, resolver: Any, profile: str | None) -> None:
        self._resolver = resolver
        self._profile = profile
        self._found: Any = None
        self._lock = threading.Lock()

    def _credentials(self) -> Any:
        with self._lock:
            if self._found is None:
                self._found = self._resolver.load_credentials()
            if self._found is None:
                raise botocore.exceptions.NoCredentialsError()
            return self._found

    def get_frozen_credentials(self) -> Any:
        return self._credentials().get_frozen_credentials()

    @property
    def method(self) -> str:
        """How they were found (botocore reads it while making a client)."""
        with self._lock:
            found = self._found
        return str(found.method) if found is not None else "deferred"

    def get_deferred_property(self, name: str) -> Callable[[], Any]:
        """What botocore asks for while building a client (e.g. ``account_id``)."""

        def get() -> Any:
            with self._lock:
                found = self._found
            return getattr(found, name, None) if found is not None else None

        return get


class _DeferredProvider:
    """Stands in for botocore's credential resolver (the session component)."""

    def __init__(self, resolver: Any, profile: str | None) -> None:
        self._credentials = _DeferredCredentials(resolver, profile)

    def load_credentials(self) -> _DeferredCredentials:
        return self._credentials


def session_for(profile: str | None) -> boto3.session.Session:
    """A boto3 session (profile ``profile``) whose credentials may come later."""
    core = botocore.session.Session(profile=profile)
    if profile is not None and profile not in core.available_profiles:
        raise ConfigError(
            f"AWS profile {profile!r} is not in {aws_files()}: add it there, or drop "
            "profile= to use the environment or an instance role"
        )
    if profile is None:
        # botocore would raise ProfileNotFound at the first request instead.
        for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            named = os.environ.get(variable)
            if named and named not in core.available_profiles:
                raise ConfigError(
                    f"{variable}={named}: no such AWS profile in {aws_files()}; add it "
                    f"there, or unset {variable}"
                )
    resolver = core.get_component("credential_provider")
    core.register_component("credential_provider", _DeferredProvider(resolver, profile))
    return boto3.session.Session(botocore_session=core)


def aws_files() -> str:
    """Where boto3 looks for profiles, as the user can check them."""
    config = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    return f"{config} or {credentials}"


def missing_credentials(action: str, where: str, profile: str | None) -> CredentialsError:
    return CredentialsError(
        f"{action} {where}: no AWS credentials found (looked for AWS_ACCESS_KEY_ID and "
        f"AWS_SECRET_ACCESS_KEY in the environment, profile {profile or 'default'!r} in "
        f"{aws_files()}, a web identity token, and instance or container metadata); "
        f"export them, or for the service {_where_for_service()}"
    )


def _where_for_service() -> str:
    file = _service_file()
    if file is None:
        return f"give it an environment file with them ({_NO_FILE})"
    return f"put them into {file}"


def _refused_where() -> str:
    file = _service_file()
    if file is None:
        return (
            "the service reads no environment file: they come from its AWS profile or "
            f"the instance role; {_NO_FILE} gives it one"
        )
    return f"for the service: {file}"


def rejected_credentials(action: str, where: str, code: str) -> CredentialsError:
    if code == "RequestTimeTooSkewed":
        return CredentialsError(
            f"{action} {where}: S3 refuses the time of the requests ({code}): this "
            "machine's clock is more than 15 minutes from the server's; set it right "
            "(NTP: systemd-timesyncd or chrony) and the uploads resume"
        )
    why = "have expired" if "Expired" in code or "Refresh" in code else "were refused"
    return CredentialsError(
        f"{action} {where}: the AWS credentials {why} ({code}); check or renew them "
        f"and the region ({_refused_where()})"
    )
