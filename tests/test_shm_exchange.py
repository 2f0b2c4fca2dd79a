"""The shared-memory gather of block-sharded ranks on one machine (`mbbo.shm_exchange`): 2 processes, gloo on
127.0.0.1 for the set-up, timeouts everywhere."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mbbo.distributed import BlockShard, DistributedError, close_process_group, free_port
from mbbo.shm_exchange import SharedMemoryExchange, shared_memory_usable, transport
from test_distributed import TIMEOUT_S, _two_processes


def _join(rank: int, port: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _exchange_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    ok = False
    try:
        exchange = SharedMemoryExchange(timeout_s=TIMEOUT_S, capacity=64)
        got = []
        # sizes that grow past the capacity (the file is re-created, twice as large) and shrink again; each
        # rank's bytes depend on the exchange and the rank, so a stale or foreign slot shows
        for k, nbytes in enumerate((8, 64, 24, 200, 1000, 16, 16, 16, 3000, 40)):
            values = (torch.arange(nbytes) * (k + 1) + 7 * rank) % 251
            exchange.send_buffer(nbytes).copy_(values.to(torch.uint8))
            got.append((nbytes, exchange.exchange(nbytes).clone()))
        torch.save({"got": got, "capacity": exchange.capacity, "exchanges": exchange.exchanges}, f"{out}.{rank}")
        ok = True
    finally:
        close_process_group(synchronise=ok)


def test_exchange_gives_every_rank_all_slots_across_parities_and_growth(tmp_path: Path) -> None:
    """Ten exchanges of 8 to 3000 bytes from a 64-byte capacity: every rank receives both ranks' bytes of each
    exchange (the two parities of slots alternate; the file grows when a buffer does not fit)."""
    out = str(tmp_path / "exchange")
    _two_processes(_exchange_worker, free_port(), out)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in range(2):
        assert ranks[r]["capacity"] >= 3000
        for k, (nbytes, received) in enumerate(ranks[r]["got"]):
            expected = torch.stack([((torch.arange(nbytes) * (k + 1) + 7 * q) % 251).to(torch.uint8)
                                    for q in range(2)])
            assert torch.equal(received, expected), (r, k)
    # after the last growth the counter restarted: both ranks agree on it
    assert ranks[0]["exchanges"] == ranks[1]["exchanges"] > 0


def _dead_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    exchange = SharedMemoryExchange(timeout_s=TIMEOUT_S)
    if rank == 1:
        os._exit(0)  # leaves without exchanging (and without a word to the process group)
    start = time.monotonic()
    try:
        exchange.send_buffer(8).zero_()
        exchange.exchange(8)
        message = "no error"
    except DistributedError as exc:
        message = str(exc)
    torch.save({"message": message, "seconds": time.monotonic() - start}, f"{out}.{rank}")


def test_a_rank_that_exits_is_noticed_long_before_the_timeout(tmp_path: Path) -> None:
    """Rank 1 exits without exchanging: rank 0 fails with a DistributedError that names it, within seconds
    (the timeout is TIMEOUT_S)."""
    out = str(tmp_path / "dead")
    _two_processes(_dead_worker, free_port(), out)
    got = torch.load(f"{out}.0")
    assert "rank(s) [1] exited before gather 1" in got["message"], got["message"]
    assert got["seconds"] < 10 < TIMEOUT_S


def test_transport_and_shared_memory_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """$MBBO_DIST_TRANSPORT: "auto" by default, a wrong value refused by name; `shared_memory_usable` on a 1-rank
    gloo group on this machine: usable on x86-64, refused with the reason on a processor that may reorder stores."""
    monkeypatch.delenv("MBBO_DIST_TRANSPORT", raising=False)
    assert transport() == "auto"
    monkeypatch.setenv("MBBO_DIST_TRANSPORT", "backend")
    assert transport() == "backend"
    monkeypatch.setenv("MBBO_DIST_TRANSPORT", "tcp")
    with pytest.raises(ValueError, match=r"MBBO_DIST_TRANSPORT must be one of \('auto', 'backend', 'shm'\)"):
        transport()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert shared_memory_usable() is None
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
        assert "this processor (aarch64) may reorder stores" in str(shared_memory_usable())
    finally:
        dist.destroy_process_group()


def _shard_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    ok = False
    try:
        got: dict[str, object] = {}
        for how in ("auto", "backend"):
            os.environ["MBBO_DIST_TRANSPORT"] = how
            got[how] = BlockShard.from_process_group(6).exchange is not None
        # rank 1 cannot map rank 0's file (as in a container with a private /dev/shm): "auto" falls back to the
        # group's all_gather on both ranks, "shm" fails on both
        mapped = torch.from_file
        if rank == 1:
            torch.from_file = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no such file"))  # type: ignore
        os.environ["MBBO_DIST_TRANSPORT"] = "auto"
        got["unmapped auto"] = BlockShard.from_process_group(6).exchange is not None
        os.environ["MBBO_DIST_TRANSPORT"] = "shm"
        try:
            BlockShard.from_process_group(6)
        except DistributedError as exc:
            got["unmapped shm"] = str(exc)
        torch.from_file = mapped
        platform.machine = lambda: "aarch64"  # type: ignore[assignment]
        try:
            BlockShard.from_process_group(6)
        except DistributedError as exc:
            got["forced"] = str(exc)
        torch.save(got, f"{out}.{rank}")
        ok = True
    finally:
        close_process_group(synchronise=ok)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="shared memory needs x86-64")
def test_block_shard_gathers_through_shared_memory_unless_told_otherwise(tmp_path: Path) -> None:
    """`BlockShard.from_process_group`: shared memory under "auto" (both ranks here, gloo, x86-64), the process
    group's collective under "backend" and under "auto" when a rank cannot map the file; "shm" where shared
    memory cannot be used fails with the reason."""
    out = str(tmp_path / "shard")
    _two_processes(_shard_worker, free_port(), out)
    for r in range(2):
        got = torch.load(f"{out}.{r}")
        assert got["auto"] is True and got["backend"] is False
        assert got["unmapped auto"] is False
        assert "MBBO_DIST_TRANSPORT=shm, but not every rank could map the shared file" in str(got["unmapped shm"])
        assert "MBBO_DIST_TRANSPORT=shm, but the ranks cannot gather through shared memory: this processor" in str(
            got["forced"])


def test_alive_tells_running_exited_and_zombie_processes() -> None:
    """`_alive`: this process runs; a child that exited but was not reaped yet (a zombie) counts as gone, as does
    a reaped one."""
    import subprocess
    import sys

    from mbbo.shm_exchange import _alive

    assert _alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while _alive(child.pid) and time.monotonic() < deadline:  # exits; unreaped until `wait`
        time.sleep(0.05)
    assert not _alive(child.pid)
    child.wait()
    assert not _alive(child.pid)
