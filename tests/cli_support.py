"""Running the real ``shardkit`` console script as an operator does: a subprocess, its env and cwd."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from sa_shardkit.testing import LocalPostgres

REPO = Path(__file__).resolve().parent.parent
PASSWORD_USER = "shardkit_pw"
PASSWORD = "s3cret-pw"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any shard configuration, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("SHARD_") or k.startswith("SHARDKIT_"))}
    env.update(extra or {})
    return env


def shardkit(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``shardkit ARGS`` (as ``python -m sa_shardkit``) with only ``env``'s shard configuration."""
    return subprocess.run(
        [sys.executable, "-m", "sa_shardkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(env),
        timeout=timeout,
    )


def shardkit_script(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The installed ``shardkit`` console script (unlike ``python -m``, it does not put the working
    directory on sys.path), with only this checkout's package importable from PYTHONPATH."""
    shim = cwd.parent / f"{cwd.name}-pythonpath"
    shim.mkdir(exist_ok=True)
    if not (shim / "sa_shardkit").exists():
        (shim / "sa_shardkit").symlink_to(REPO / "sa_shardkit")
    script = Path(sys.executable).with_name("shardkit")
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env({**(env or {}), "PYTHONPATH": str(shim)}),
        timeout=timeout,
    )


def require_password(server: LocalPostgres) -> str:
    """A role that must log in with scram-sha-256 on ``server`` (others keep trust); its URL, no password."""
    hba = server.data_dir / "pg_hba.conf"
    rule = f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
    if rule not in hba.read_text():
        hba.write_text(rule + hba.read_text())  # first match wins: before the trust lines
    url = make_url(server.url)
    with psycopg.connect(
        host=url.host, port=url.port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_USER,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(f"{verb} ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        conn.execute("SELECT pg_reload_conf()")
    for _ in range(100):  # the reload is asynchronous: wait until a password is really asked for
        try:
            psycopg.connect(host=url.host, port=url.port, user=PASSWORD_USER, dbname="postgres").close()
        except psycopg.OperationalError:
            break
        time.sleep(0.05)
    return f"postgresql+psycopg://{PASSWORD_USER}@127.0.0.1:{url.port}/postgres"
