"""``mbbo run --nproc R`` for the federated methods: the launcher lives in :mod:`mbbo.distributed` (shared with
the block-sharded multi-block runs); re-exported here."""

from __future__ import annotations

from mbbo.distributed import free_port, launch, strip_nproc

__all__ = ["free_port", "launch", "strip_nproc"]
