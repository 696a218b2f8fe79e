"""Leases of reply-topic partitions, one partition per gateway replica.

A lease is a PostgreSQL session-level advisory lock, ``(topic key,
partition)``, held on a connection of its own for the replica's lifetime.
PostgreSQL releases the lock when that connection closes, so a replica that
dies, even by SIGKILL, frees its partition once the server detects the closed
socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import asyncpg

logger = logging.getLogger(__name__)

_CHECK_TIMEOUT_S = 5.0


def lease_key(topic: str) -> int:
    """Return the first key of the advisory locks for ``topic``, a signed 32-bit integer."""
    digest = hashlib.sha256(f"graphinfer-reply-lease:{topic}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


class NoPartitionFree(Exception):
    """Every partition of the reply topic is leased by another replica."""


class PartitionLease:
    """Holds the advisory lock on one partition of the reply topic."""

    def __init__(self, dsn: str, topic: str, connect_timeout_s: float) -> None:
        self.dsn = dsn
        self.topic = topic
        self.key = lease_key(topic)
        self.connect_timeout_s = connect_timeout_s
        self.partition: int | None = None
        self._connection: asyncpg.Connection | None = None

    async def acquire(self, partitions: int, prefer: int | None = None) -> int:
        """Lock the first free partition, trying ``prefer`` first; return its number.

        Raises :class:`NoPartitionFree` when other replicas hold all of them,
        and asyncpg or OS errors when the database is unreachable.
        """
        await self.release()
        connection = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
        order = list(range(partitions))
        if prefer is not None and prefer in order:
            order.remove(prefer)
            order.insert(0, prefer)
        try:
            for partition in order:
                if await connection.fetchval("SELECT pg_try_advisory_lock($1, $2)", self.key, partition):
                    self._connection = connection
                    self.partition = partition
                    logger.info("reply partition leased topic=%s partition=%d", self.topic, partition)
                    return partition
        except BaseException:
            await _close(connection)
            raise
        await _close(connection)
        raise NoPartitionFree(
            f"all {partitions} partitions of {self.topic} are leased by other gateway replicas; "
            "run at most that many replicas, or recreate the topic with more partitions and raise "
            "GRAPHINFER_REPLY_PARTITIONS to match"
        )

    async def is_held(self) -> bool:
        """Check that the lock's connection still responds, because a closed connection has lost the lock."""
        connection = self._connection
        if connection is None or connection.is_closed():
            return False
        try:
            await connection.fetchval("SELECT 1", timeout=_CHECK_TIMEOUT_S)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            logger.warning("reply partition lease lost partition=%s error=%r", self.partition, exc)
            return False
        return True

    async def release(self) -> None:
        """Close the lock's connection, which releases the lock."""
        connection, self._connection = self._connection, None
        if connection is not None:
            # Shielded so a cancelled shutdown still closes the connection
            # instead of leaving the lock held until the socket times out.
            await asyncio.shield(_close(connection))
            logger.info("reply partition released topic=%s partition=%s", self.topic, self.partition)
        self.partition = None


async def _close(connection: asyncpg.Connection) -> None:
    try:
        await connection.close(timeout=_CHECK_TIMEOUT_S)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        connection.terminate()
