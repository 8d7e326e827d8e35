"""Ed25519 cache keys in Nix's file format, and signing narinfo fingerprints.

The secret key is the one thing the uploader holds that must never leak, so
this module is strict about it: a key file readable by anyone but its owner
is refused, and no message, repr or chained exception carries key bytes.
File format (as written by ``nix-store --generate-binary-cache-key``):
``<name>:<base64>`` with 64 bytes (seed then public key) for a secret key
and 32 bytes for a public key; signatures are ``<name>:<base64 of 64 bytes>``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
from collections.abc import Callable
from typing import TypeVar

import nacl.exceptions
import nacl.signing

from uploader._exceptions import KeyFileError
from uploader.fileaccess import other_accessors

__all__ = [
    "PublicKey",
    "SecretKey",
    "generate",
    "write_public_key",
    "write_secret_key",
]

_Key = TypeVar("_Key", "SecretKey", "PublicKey")

_SEED_SIZE = 32
_PUBLIC_SIZE = 32
_SECRET_SIZE = _SEED_SIZE + _PUBLIC_SIZE
_SIGNATURE_SIZE = 64
# Far above any real key file; stops us reading a wrong, huge file into memory.
_MAX_KEY_FILE = 4096


class SecretKey:
    """A named Ed25519 signing key; ``repr`` shows only the name."""

    __slots__ = ("_signing_key", "name")

    def __init__(self, name: str, signing_key: nacl.signing.SigningKey) -> None:
        _check_name(name)
        self.name = name
        self._signing_key = signing_key

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        """Read ``name:base64(64 bytes)``; surrounding whitespace is ignored."""
        name, raw = _split_key(text, "secret", _SECRET_SIZE)
        signing_key = nacl.signing.SigningKey(raw[:_SEED_SIZE])
        if bytes(signing_key.verify_key) != raw[_SEED_SIZE:]:
            raise KeyFileError(f"secret key {name!r} is corrupt: its public half does not match")
        return cls(name, signing_key)

    @classmethod
    def load(cls, path: str) -> SecretKey:
        """Load a key file, refusing one that group or others could read or write."""
        return _load(path, cls.parse, private=True)

    def sign(self, fingerprint: bytes) -> str:
        """A ``Sig:`` value: ``name:base64(detached signature)``."""
        signature = self._signing_key.sign(fingerprint).signature
        return f"{self.name}:{base64.b64encode(signature).decode()}"

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, bytes(self._signing_key.verify_key))

    def to_text(self) -> str:
        """The key file contents, without a trailing newline (as Nix writes it)."""
        raw = bytes(self._signing_key) + bytes(self._signing_key.verify_key)
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r})"


class PublicKey:
    """A named Ed25519 verification key, as listed in ``trusted-public-keys``."""

    __slots__ = ("_verify_key", "name")

    def __init__(self, name: str, raw: bytes) -> None:
        _check_name(name)
        if len(raw) != _PUBLIC_SIZE:
            raise ValueError(f"an Ed25519 public key is {_PUBLIC_SIZE} bytes, got {len(raw)}")
        self.name = name
        self._verify_key = nacl.signing.VerifyKey(raw)

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Read ``name:base64(32 bytes)``; surrounding whitespace is ignored."""
        return cls(*_split_key(text, "public", _PUBLIC_SIZE))

    @classmethod
    def load(cls, path: str) -> PublicKey:
        return _load(path, cls.parse, private=False)

    @classmethod
    def from_argument(cls, value: str) -> PublicKey:
        """A command-line key: a public key file, or ``name:base64`` as in
        trusted-public-keys.  A value that is neither but reads as a path
        is said to be a missing file, not a malformed key."""
        if os.path.isfile(value):
            return cls.load(value)
        if os.path.isdir(value):
            raise KeyFileError(f"public key {value!r} is a directory, not a key file")
        try:
            return cls.parse(value)
        except KeyFileError:
            if ":" not in value or value.startswith(("/", "./", "../", "~")):
                raise KeyFileError(
                    f"public key {value!r}: no such file (give a key file, or NAME:BASE64 "
                    "as in trusted-public-keys)"
                ) from None
            raise

    def verify(self, fingerprint: bytes, sig: str) -> bool:
        """Whether ``sig`` (``name:base64``) is this key's signature of ``fingerprint``."""
        name, colon, payload = sig.partition(":")
        if not colon or name != self.name:
            return False
        try:
            signature = base64.b64decode(payload, validate=True)
        except binascii.Error:
            return False
        if len(signature) != _SIGNATURE_SIZE:
            return False
        try:
            self._verify_key.verify(fingerprint, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def to_text(self) -> str:
        return f"{self.name}:{base64.b64encode(bytes(self._verify_key)).decode()}"

    @property
    def raw(self) -> bytes:
        """The key's 32 bytes, whatever its name: one key under two names is
        still one key."""
        return bytes(self._verify_key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return self.to_text() == other.to_text()

    def __hash__(self) -> int:
        return hash(self.to_text())

    def __repr__(self) -> str:
        return f"PublicKey({self.to_text()!r})"


def generate(name: str) -> SecretKey:
    """A new random key called ``name`` (e.g. ``cache.example.org-1``)."""
    return SecretKey(name, nacl.signing.SigningKey.generate())


def write_secret_key(path: str, key: SecretKey) -> None:
    """Create ``path`` (mode 0600) holding ``key``; never overwrites an existing file."""
    _write_new_file(path, key.to_text(), 0o600)


def write_public_key(path: str, key: PublicKey) -> None:
    """Create ``path`` (mode 0644) holding ``key``; never overwrites an existing file."""
    _write_new_file(path, key.to_text(), 0o644)


def _check_name(name: str, *, shown: bool = True) -> None:
    # A ':' would move the name/key boundary; whitespace would break the
    # one-line key files and the Sig: lines of narinfo files.
    if not name or ":" in name or any(c.isspace() or not c.isprintable() for c in name):
        quoted = f" {name!r}" if shown else ""
        raise KeyFileError(f"invalid key name{quoted}: must be non-empty, without ':' or spaces")


def _base64_like(text: str) -> bool:
    """Whether ``text`` could be a key's base64 rather than its name."""
    return len(text) >= 40 and re.fullmatch(r"[A-Za-z0-9+/]+=*", text) is not None


def _split_key(text: str, kind: str, size: int) -> tuple[str, bytes]:
    """Split ``name:base64`` and decode it; errors never quote the payload.

    Surrounding whitespace is ignored as Nix ignores it: a trailing blank
    line, or CRLF line endings from an editor on another system.
    """
    text = text.strip()
    name, colon, payload = text.partition(":")
    if not colon or not name or not payload:
        raise KeyFileError(f"{kind} key is not in the form <name>:<base64>")
    # A secret key file's "name" may be its secret (the two halves swapped,
    # or the name missing): never quoted.
    named = kind != "secret"
    _check_name(name, shown=named)
    label = f"{kind} key {name!r}" if named else f"{kind} key"
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error:
        where = " (it contains a carriage return)" if "\r" in payload else ""
        if not named and _base64_like(name):
            where += " (is it written <base64>:<name>? the name comes first)"
        raise KeyFileError(f"{label} is not valid base64{where}") from None
    if len(raw) != size:
        # Handing over the wrong file of a key pair is the likely mistake.
        other = {_SECRET_SIZE: "secret", _PUBLIC_SIZE: "public"}.get(len(raw))
        hint = f" (this looks like a {other} key)" if other and other != kind else ""
        raise KeyFileError(f"{label} has {len(raw)} bytes, expected {size}{hint}")
    return name, raw


def _load(path: str, parse: Callable[[str], _Key], *, private: bool) -> _Key:
    text = _read_key_file(path, private=private)
    try:
        return parse(text)
    except KeyFileError as e:
        raise KeyFileError(f"{path}: {e}") from None


def _read_key_file(path: str, *, private: bool) -> str:
    # O_NONBLOCK so that a fifo in place of the key cannot hang startup.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"cannot open key file {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        others = other_accessors(fd) if private else []
        if others:
            _refuse_public_key(fd, path)
            fix = (
                f"setfacl -b {path}; chmod 600 {path}"
                if "(ACL)" in "".join(others)
                else (f"chmod 600 {path}")
            )
            raise KeyFileError(
                f"secret key file {path} (mode {stat.S_IMODE(mode):04o}) is accessible by "
                f"{' and '.join(others)}; run {fix}"
            )
        data = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"key file {path} is too large to be a key")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is not a text key file") from None


def _refuse_public_key(fd: int, path: str) -> None:
    """A public key given for the secret one (keygen leaves it 0644): say
    that, not to chmod 600 a key that is meant to be public."""
    try:
        PublicKey.parse(os.read(fd, _MAX_KEY_FILE).decode())
    except (KeyFileError, UnicodeDecodeError, ValueError):
        return
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    raise KeyFileError(
        f"{path} is a public key; give the secret key file (the first file `keygen` wrote)"
    )


def _write_new_file(path: str, text: str, mode: int) -> None:
    # Written under a temporary name and hard-linked into place: readers never
    # see a half-written key, and link() fails atomically if path exists.
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, mode)  # the umask may have taken bits away
            f.write(text.encode())
            f.flush()
            os.fsync(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyFileError(f"{path} already exists; not overwriting a key file") from None
        except OSError as e:
            raise KeyFileError(f"cannot create {path}: {e.strerror}") from None
    finally:
        os.unlink(tmp)
