"""moto in server mode: the tests' second S3 implementation.

SeaweedFS alone would let behaviours only it has (anonymous reads of every
bucket, any credentials accepted, its own listing and error shapes) pass for
S3.  moto reimplements AWS's S3 API from its documentation, so every S3 test
runs against both.  It keeps objects in memory: a restart empties it, which
is why tests that restart the server stay on SeaweedFS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from tests.support.services import S3Server, free_ports

__all__ = ["MotoServer", "start_moto"]


def _public_read(bucket: str) -> str:
    """The policy a public binary cache has on AWS: anyone may read objects.
    moto, like S3, refuses anonymous reads without it, and Nix substitutes
    over plain HTTP.  On AWS s3:GetObject also allows HEAD; moto checks HEAD
    against an action of its own, s3:HeadObject (moto 5.x), which Nix needs
    to ask whether a narinfo exists."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": ["s3:GetObject", "s3:HeadObject"],
                    "Resource": f"arn:aws:s3:::{bucket}/*",
                }
            ],
        }
    )


@dataclass
class MotoServer(S3Server):
    """`python -m moto.server` on 127.0.0.1."""

    process: subprocess.Popen[bytes] | None
    port: int
    log_path: str
    name = "moto"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self, name: str) -> str:
        client = self.client()
        client.create_bucket(Bucket=name)
        client.put_bucket_policy(Bucket=name, Policy=_public_read(name))
        return name

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_moto(timeout: float = 60) -> MotoServer:
    """Start moto's S3 on a free loopback port; return once it answers."""
    (port,) = free_ports(1)
    log_path = os.path.join(tempfile.mkdtemp(prefix="ncu-moto-"), "moto.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MotoServer(process=process, port=port, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto exited; see {log_path}")
        try:
            with urllib.request.urlopen(f"{server.endpoint}/moto-api/data.json", timeout=2):
                return server
        except OSError:  # not listening yet
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"moto not ready after {timeout}s; see {log_path}")
