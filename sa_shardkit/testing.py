"""Throwaway PostgreSQL servers from local binaries, for tests, benchmarks and examples.

Each :class:`LocalPostgres` is an independent server (own data directory, own port), so a test can
stop, block or restart one shard for real. ``initdb`` runs once per :class:`PostgresFleet`; further
servers copy that template directory, so starting four servers takes a few seconds. As root, the
servers run as the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import ShardManager

_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "max_prepared_transactions": "50",
    "shared_buffers": "32MB",
    "wal_level": "replica",
    "max_wal_senders": "10",
    # a test replica that lost its stream (its primary restarted on another port) must find the WAL
    # it needs when it reconnects, not a recycled segment ("requested WAL segment ... removed")
    "wal_keep_size": "512MB",
    "hot_standby": "on",
    "log_min_messages": "warning",
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
}


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    env = os.environ.get("SHARDKIT_PG_BIN")
    candidates = [env] if env else []
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).resolve().parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += sorted(glob.glob("/usr/local/pgsql*/bin"), reverse=True)
    for directory in candidates:
        if directory and (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres() -> list[str]:
    """Command prefix to run PostgreSQL tools as a non-root user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--"]
    return ["su", "postgres", "-s", "/bin/sh", "-c"]  # pragma: no cover - runuser is in util-linux


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam("postgres")
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _signal(pid: int, signum: int) -> None:
    """Signal a server process; one that exited since it was listed (a finished backend) is skipped."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class LocalPostgres:
    """One PostgreSQL server in its own data directory on a free port."""

    def __init__(self, bin_dir: Path, data_dir: Path, name: str) -> None:
        self.bin_dir = bin_dir
        self.data_dir = data_dir
        self.name = name
        self.port = free_port()
        self.log_file = data_dir.parent / f"{name}.log"
        self.extra_settings: dict[str, str] = {}
        """Settings kept across rewrites (a restart on a new port must not drop primary_conninfo)."""

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_as_postgres(), *args], check=check, capture_output=True, text=True, timeout=120
        )

    def write_settings(self, extra: dict[str, str] | None = None) -> None:
        self.extra_settings.update(extra or {})
        settings = {**_SETTINGS, "port": str(self.port), **self.extra_settings}
        conf = self.data_dir / "postgresql.auto.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        _chown_to_postgres(conf)

    def start(self) -> None:
        """Start (or restart after :meth:`stop`) on the same port; waits until it accepts connections."""
        if self.is_running():
            return
        for _ in range(3):
            result = self._run(
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
                "start",
                check=False,
            )
            if result.returncode == 0:
                return
            if "could not bind" in self._log_tail() or "already in use" in self._log_tail():
                self.port = free_port()  # somebody took the port while we were stopped
                self.write_settings()
                continue
            break
        raise RuntimeError(f"could not start PostgreSQL {self.name}: {result.stderr}\n{self._log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate, as ``pg_ctl stop -m``)."""
        if self.is_running():
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False
            )

    def pause(self) -> int:
        """Freeze the server (SIGSTOP to the postmaster and backends): connections hang, unlike stop."""
        pids = self._pids()
        for pid in pids:
            _signal(pid, 19)
        return len(pids)

    def resume(self) -> None:
        for pid in self._pids():
            _signal(pid, 18)

    def _pids(self) -> list[int]:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return []
        main = int(pid_file.read_text().splitlines()[0])
        children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
        return [main, *map(int, children)]

    def is_running(self) -> bool:
        result = self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status", check=False)
        return result.returncode == 0

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text()[-2000:]
        except OSError:
            return ""

    def make_replica(self, name: str | None = None) -> LocalPostgres:
        """A streaming replica of this server (``pg_basebackup -R``), started and in recovery."""
        name = name or f"{self.name}-replica"
        data_dir = self.data_dir.parent / name
        replica = LocalPostgres(self.bin_dir, data_dir, name)
        self._run(
            str(self.bin_dir / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-D",
            str(data_dir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        # -R wrote primary_conninfo to postgresql.auto.conf (after a copy of the primary's settings,
        # port included); keep only the primary_* lines, or the replica never streams
        recovery = (data_dir / "postgresql.auto.conf").read_text()
        replica.write_settings(
            {
                key.strip(): value.strip()
                for key, _, value in (line.partition("=") for line in recovery.splitlines())
                if key.strip().startswith("primary_")
            }
        )
        replica.start()
        return replica


class PostgresFleet:
    """Several independent local PostgreSQL servers sharing one temporary root directory."""

    def __init__(self, count: int, *, bin_dir: Path | None = None, root: Path | None = None) -> None:
        found = bin_dir or find_pg_bin()
        if found is None:
            raise RuntimeError(
                "PostgreSQL server binaries (initdb, pg_ctl) were not found. Install them "
                "(Debian/Ubuntu: apt-get install postgresql), set SHARDKIT_PG_BIN to their directory, "
                "or set SHARDKIT_TEST_URLS to comma-separated URLs of running servers."
            )
        self.bin_dir = found
        self.root = root or Path(tempfile.mkdtemp(prefix="shardkit-pg-"))
        self.root.chmod(0o755)
        _chown_to_postgres(self.root)
        self.servers: list[LocalPostgres] = []
        self._template: Path | None = None
        for i in range(1, count + 1):
            self.add(f"pg{i}")

    def _make_template(self) -> Path:
        template = self.root / "template"
        template.mkdir()
        _chown_to_postgres(template)
        subprocess.run(
            [
                *_as_postgres(),
                str(self.bin_dir / "initdb"),
                "-D",
                str(template),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return template

    def add(self, name: str) -> LocalPostgres:
        """Create and start one more server."""
        if self._template is None:
            self._template = self._make_template()
        data_dir = self.root / name
        shutil.copytree(self._template, data_dir, symlinks=True)
        data_dir.chmod(0o700)
        _chown_to_postgres(data_dir)
        server = LocalPostgres(self.bin_dir, data_dir, name)
        server.write_settings()
        server.start()
        self.servers.append(server)
        return server

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` binary (``SHARDKIT_PGBOUNCER``, PATH, or Debian's /usr/sbin), or None."""
    for candidate in (os.environ.get("SHARDKIT_PGBOUNCER"), shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class LocalPgBouncer:
    """A PgBouncer in front of one :class:`LocalPostgres`, in transaction pooling mode by default.

    Every database name is forwarded to the server (``* = host=... port=...``); at most
    ``pool_size`` server connections per database and user, however many clients connect.
    """

    def __init__(self, server: LocalPostgres, *, pool_mode: str = "transaction", pool_size: int = 5) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError(
                "pgbouncer was not found: install it (Debian/Ubuntu: apt-get install pgbouncer) "
                "or set SHARDKIT_PGBOUNCER to the binary"
            )
        self.server = server
        self.port = free_port()
        self.dir = server.data_dir.parent / f"{server.name}-pgbouncer-{self.port}"
        self.dir.mkdir()
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.dir / "users.txt"),
            "pool_mode": pool_mode,
            "default_pool_size": str(pool_size),
            "max_client_conn": "1000",
            "pidfile": str(self.dir / "pgbouncer.pid"),
            "logfile": str(self.dir / "pgbouncer.log"),
            "admin_users": "postgres",
            "ignore_startup_parameters": "extra_float_digits,options",
        }
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n* = host=127.0.0.1 port={server.port}\n\n[pgbouncer]\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        _chown_to_postgres(self.dir)
        result = subprocess.run(
            [*_as_postgres(), binary, "-d", str(self.dir / "pgbouncer.ini")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"could not start pgbouncer: {result.stderr}{self.log_tail()}")
        self._wait_until_listening()

    def _wait_until_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer did not listen on {self.port}: {self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def log_tail(self) -> str:
        try:
            return (self.dir / "pgbouncer.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        pid_file = self.dir / "pgbouncer.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().split()[0])
        _signal(pid, 15)  # SIGTERM: immediate shutdown
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


@contextmanager
def local_fleet(count: int = 4) -> Iterator[PostgresFleet]:
    """``with local_fleet(4) as fleet: fleet.urls`` -- servers are removed afterwards."""
    fleet = PostgresFleet(count)
    try:
        yield fleet
    finally:
        fleet.close()


@contextmanager
def manager_from_env_or_local_fleet(count: int = 4) -> Iterator[ShardManager]:
    """The shards of ``SHARD_<N>_URL`` if any is set, else ``count`` local servers removed afterwards.

    The examples' bootstrapping: run against your own shards, or try them with nothing set up.
    """
    from .manager import ShardManager

    if any(k.startswith("SHARD_") and k.endswith("_URL") for k in os.environ):
        with ShardManager.from_env() as manager:
            yield manager
        return
    print(f"no SHARD_<N>_URL set: starting {count} local PostgreSQL servers", file=sys.stderr)
    with local_fleet(count) as fleet, ShardManager.from_urls(fleet.urls) as manager:
        yield manager


def wait_until_accepting(url: str, timeout: float = 30.0) -> None:
    """Block until ``url`` accepts connections (used after a restart)."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(
                host=parsed.host,
                port=parsed.port,
                user=parsed.username,
                dbname=parsed.database,
                connect_timeout=2,
            ).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def urls_from_env() -> Sequence[str] | None:
    raw = os.environ.get("SHARDKIT_TEST_URLS", "").strip()
    return [u.strip() for u in raw.split(",") if u.strip()] or None
