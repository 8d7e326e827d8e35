"""`keygen`: signing key pairs in Nix's format."""

from __future__ import annotations

import os

import click

from uploader._exceptions import UploaderError
from uploader.cli._common import EXIT_USAGE, fail, main
from uploader.signing import generate, write_public_key, write_secret_key


@main.command()
@click.argument("name")
@click.argument("secret_key_file", type=click.Path(dir_okay=False))
@click.argument("public_key_file", type=click.Path(dir_okay=False))
def keygen(name: str, secret_key_file: str, public_key_file: str) -> None:
    """Create a signing key pair, like `nix-store --generate-binary-cache-key`.

    NAME is the key's name, conventionally the cache's host name plus a
    number (e.g. cache.example.org-1).  SECRET_KEY_FILE is created with mode
    0600 and PUBLIC_KEY_FILE with 0644; existing files are never overwritten,
    and when either cannot be written neither is left behind.
    Put the public key into `trusted-public-keys` on machines that substitute.
    """
    if os.path.abspath(secret_key_file) == os.path.abspath(public_key_file):
        fail("the secret and the public key need two different files", EXIT_USAGE)
    try:
        key = generate(name)
    except (UploaderError, ValueError) as e:
        fail(str(e), EXIT_USAGE)  # a NAME that cannot be a key's
    try:
        write_secret_key(secret_key_file, key)
    except (UploaderError, ValueError) as e:
        fail(str(e))
    try:
        write_public_key(public_key_file, key.public_key())
    except UploaderError as e:
        # Both files or neither: a retry must not find half a pair in its way.
        os.unlink(secret_key_file)
        fail(f"{e}; {secret_key_file} was not kept")
    click.echo(key.public_key().to_text())
