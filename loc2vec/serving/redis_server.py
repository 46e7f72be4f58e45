"""A local redis-server for the Redis online store (`loc2vec redis start|stop|ping`), bound to 127.0.0.1.

Only for a connection string naming this machine (127.0.0.1 or localhost); a remote Redis is someone
else's to run. Its data (an append-only file) lives in data/feast/redis/: it is derived from the offline
store, and a publish whose spot check finds it empty or stale rebuilds it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from loc2vec.core.errors import ConfigError, Loc2VecError

LOCAL_HOSTS = ("127.0.0.1", "localhost")


class RedisServerError(Loc2VecError, RuntimeError):
    """redis-server is missing, or did not start or stop."""


@dataclass(frozen=True)
class RedisAddress:
    """Where a Feast Redis connection string points (host:port[,password=…][,db=N])."""

    host: str
    port: int
    password: str | None = None

    @classmethod
    def parse(cls, connection: str) -> RedisAddress:
        """Parse Feast's connection string.

        Raises:
            ConfigError: not host:port[,key=value…].
        """
        first, *options = connection.split(",")
        host, _, port = first.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"publish.redis: expected host:port[,password=…], got {first!r}")
        password = next((o.split("=", 1)[1] for o in options if o.startswith("password=")), None)
        return cls(host, int(port), password)


def _client(addr: RedisAddress):
    import redis

    return redis.Redis(host=addr.host, port=addr.port, password=addr.password, socket_timeout=2)


def ping(connection: str) -> bool:
    """Whether a Redis server answers at `connection`."""
    import redis

    try:
        return bool(_client(RedisAddress.parse(connection)).ping())
    except redis.RedisError:
        return False


def start(connection: str, data_dir: Path, *, timeout_s: float = 30) -> bool:
    """Start redis-server for `connection` (daemonized, 127.0.0.1, data in `data_dir`) unless one answers;
    returns whether it started one.

    Raises:
        ConfigError: the connection string names another machine.
        RedisServerError: redis-server is not installed, or did not answer within timeout_s.
    """
    addr = RedisAddress.parse(connection)
    if ping(connection):
        return False
    if addr.host not in LOCAL_HOSTS:
        raise ConfigError(f"publish.redis {addr.host}:{addr.port} is not on this machine: start it there")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerError("redis-server is not installed: run `make setup` (Debian package redis-server)")
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--bind", "127.0.0.1", "--port", str(addr.port), "--dir", str(data_dir), "--daemonize", "yes"]
    args += ["--appendonly", "yes", "--save", "", "--logfile", str(data_dir / "redis.log")]
    args += ["--pidfile", str(data_dir / "redis.pid")]
    if addr.password:
        args += ["--requirepass", addr.password]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RedisServerError(f"redis-server failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    deadline = time.monotonic() + timeout_s
    while not ping(connection):
        if time.monotonic() > deadline:
            raise RedisServerError(
                f"redis-server did not answer on 127.0.0.1:{addr.port}; see {data_dir / 'redis.log'}"
            )
        time.sleep(0.1)
    return True


def stop(connection: str) -> bool:
    """Shut down the local Redis at `connection` (its data is kept); returns whether one was running."""
    import redis

    addr = RedisAddress.parse(connection)
    if addr.host not in LOCAL_HOSTS or not ping(connection):
        return False
    with contextlib.suppress(redis.ConnectionError):  # the server closes the connection as it goes
        _client(addr).shutdown()
    return True
