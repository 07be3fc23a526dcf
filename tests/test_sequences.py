"""Fleet-wide sequences: hi-lo blocks from one row on the sequence shard, never an id twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_shardkit import (
    ConfigError,
    SequenceAllocator,
    SequenceError,
    ShardManager,
    ShardSequence,
    create_sequence_tables,
)
from sa_shardkit.sequences import sequences_table

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "seq_customers"
    __shard_key__ = "customer_id"
    customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, default=ShardSequence("customers"))
    name: Mapped[str] = mapped_column(String(50))


def test_ids_come_in_blocks_reserved_on_the_sequence_shard(manager: ShardManager) -> None:
    create_sequence_tables(manager)
    allocator = SequenceAllocator(manager, block_size=10)
    ids = [allocator.next_id("orders") for _ in range(25)]
    assert ids == list(range(1, 26))
    with manager.connect("shard-1") as conn:
        stored = conn.execute(select(sequences_table.c.next_id).where(sequences_table.c.name == "orders"))
        assert stored.scalar() == 31  # three blocks of 10 reserved, 25 handed out
    for shard in ("shard-2", "shard-3", "shard-4"):
        with manager.connect(shard) as conn:
            assert conn.execute(select(func.count()).select_from(sequences_table)).scalar() == 0


def test_a_second_process_never_reuses_a_reserved_block(manager: ShardManager) -> None:
    create_sequence_tables(manager)
    first = SequenceAllocator(manager, block_size=100)
    second = SequenceAllocator(manager, block_size=100)
    a = first.next_id("x")
    b = second.next_id("x")
    assert (a, b) == (1, 101)
    assert first.next_id("x") == 2  # from its own cached block


def test_the_session_assigns_sequence_ids_before_routing(manager: ShardManager) -> None:
    create_sequence_tables(manager)
    for shard in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard))
    with manager.sessionmaker(allow_cross_shard=True)() as session:
        people = [Customer(name=f"c{i}") for i in range(40)]
        session.add_all(people)
        session.commit()
        ids = sorted(c.customer_id for c in people)
    assert ids == list(range(1, 41))
    landed = {
        shard: {r[0] for r in manager.run_on_all("SELECT customer_id FROM seq_customers")[shard]}
        for shard in manager.shard_ids
    }
    for shard, found in landed.items():
        assert all(manager.shard_for(i) == shard for i in found)
    assert sum(len(v) for v in landed.values()) == 40


def test_threads_share_one_allocator_without_duplicates(manager: ShardManager) -> None:
    create_sequence_tables(manager)
    allocator = SequenceAllocator(manager, block_size=7)
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [allocator.next_id("t") for _ in range(200)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 1600


def test_missing_table_and_wrong_shard_are_clear_errors(manager: ShardManager) -> None:
    with pytest.raises(SequenceError, match="shardkit_sequences is missing on shard 'shard-1'"):
        manager.next_id("nope")
    create_sequence_tables(manager)
    SequenceAllocator(manager, shard_id="shard-2").next_id("users")
    with pytest.raises(ConfigError, match="lives on shard 'shard-2'"):
        SequenceAllocator(manager).next_id("users")
    with pytest.raises(ConfigError, match="block_size"):
        SequenceAllocator(manager, block_size=0)


ALLOCATE = """
import sys
from sa_shardkit import ShardManager, SequenceAllocator
urls = sys.argv[1].split(",")
with ShardManager.from_urls(urls) as manager:
    allocator = SequenceAllocator(manager, block_size=int(sys.argv[2]))
    print("ready", flush=True)
    for _ in range(int(sys.argv[3])):
        print(allocator.next_id("fleet"), flush=True)
"""


def test_eight_processes_some_killed_never_issue_an_id_twice(
    manager: ShardManager, shard_urls: list[str]
) -> None:
    """Eight processes allocate at once with small blocks; three are SIGKILLed mid-way. Every id any
    of them printed (handed out) is unique, and a later allocator starts past every reserved block."""
    create_sequence_tables(manager)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victims = (1, 4, 6)  # these allocate until killed, so the kill always lands mid-way
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                ALLOCATE,
                ",".join(shard_urls),
                "5",
                "1000000000" if i in victims else "400",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(8)
    ]
    outputs: list[list[str]] = [[] for _ in procs]
    readers = []
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda p=proc, o=out: o.extend(p.stdout))  # type: ignore[misc]
        reader.start()
        readers.append(reader)
    # kill three once they have handed out some ids (mid-block, mid-reservation: wherever they are)
    for index in victims:
        while len(outputs[index]) < 30 and procs[index].poll() is None:
            time.sleep(0.01)
        procs[index].send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=240)
    for reader in readers:
        reader.join()
    ids = [int(line) for out in outputs for line in out if line.strip().isdigit()]
    assert len(ids) == len(set(ids)), "an id was issued twice"
    assert [procs[i].returncode for i in victims] == [-signal.SIGKILL] * 3
    assert sum(len(outputs[i]) - 1 for i in (0, 2, 3, 5, 7)) == 5 * 400
    after = SequenceAllocator(manager, block_size=5).next_id("fleet")
    assert after > max(ids)
    with manager.connect("shard-1") as conn:
        assert (
            conn.execute(text("SELECT next_id FROM shardkit_sequences WHERE name = 'fleet'")).scalar() > after
        )
