"""The device expert cache: which expert each slot holds, which one to evict, the copies in flight, the counters.

One `ExpertCache` per offloaded model owns the slot table (`runtime/cache.py`, C++ or its Python twin), the
eviction policy (`runtime/policy.py`), every copy into a slot (demand loads and prefetches, through the copy
engine) and the counters `m2r2_moe.stats` reports. Keys are `layer * key_stride + expert`, so one pool of
slots serves every layer.

The hot path calls it, never the other way round, in this order for each wave of experts a layer needs:
`acquire` (pin a slot for each expert, classify each use, queue the demand loads) → the prefetcher's
`prefetch` / `expect` / `withdraw` → `wait` (the stall) → compute → `release` (unpin; on CUDA the slots stay
guarded by an event until the kernels reading them are done). Every use is exactly one of hit / prefetch hit /
late prefetch / miss (`OffloadStats`).
"""

from __future__ import annotations

import logging

import torch

from ..errors import CopyError, CopyTimeoutError
from ..stats import OffloadStats
from .cache import make_slot_manager
from .events import RuntimeEvents
from .store import plain_layout
from .transfer import DEMAND, CopyEngine, FailedTransfer, Transfer

logger = logging.getLogger(__name__)

HIT, PREFETCH_HIT, LATE, MISS = 0, 1, 2, 3  # how each use of an expert was served (`acquire`)
NOT_QUEUED = -2  # `prefetch`: no copy was queued


class ExpertCache:
    """Slots, eviction, in-flight copies and counters of one offloaded model."""

    def __init__(self, num_slots: int, key_stride: int, policy, engine: CopyEngine, store, pool: torch.Tensor,
                 copy_timeout_s: float, events: RuntimeEvents, clock):
        self.num_slots, self.key_stride = num_slots, key_stride
        self.slots = make_slot_manager(num_slots)
        self.policy, self.store, self.pool, self.copy_timeout_s = policy, store, pool, copy_timeout_s
        self.events, self.clock = events, clock
        self.stats = OffloadStats()
        self._prefetched: dict[int, Transfer] = {}  # key -> copy of a prefetched expert not used yet
        self._unlanded: dict[int, Transfer] = {}  # of those, the copies not seen landed yet (`queued_prefetches`)
        self._streamed: set[int] = set()  # prefetched keys a forward's routing asked for (`stream`): kept
        self.unseen_evictions: list[int] | None = None  # a prefetcher's: evictions no call of its reports (`stream`)
        self._slot_free: list[torch.cuda.Event | None] = [None] * num_slots  # CUDA: last compute reading the slot
        self._plain: dict[int, tuple | None] = {}  # layer -> the layout `_copy` submits by address (`plain_layout`)
        host = pool.device.type == "cpu" and pool.dim() == 2 and pool.is_contiguous()
        self._pool_base, self._slot_bytes = pool.data_ptr() if host else None, pool.stride(0) * pool.element_size()
        self.engine = engine  # also sets `_submit_at`

    @property
    def engine(self) -> CopyEngine:
        return self._engine

    @engine.setter
    def engine(self, engine: CopyEngine) -> None:  # `Offloader.replace_engine`: its by-address call looked up once
        self._engine = engine
        self._submit_at = getattr(engine, "submit_at", None) if self._pool_base is not None else None

    def keys(self, layer: int, experts: list[int]) -> list[int]:
        return [layer * self.key_stride + e for e in experts]

    # -- the hot path ----------------------------------------------------------------------------
    def acquire(self, layer: int, experts: list[int], keys: list[int], now: int,
                ) -> tuple[list[int], list[Transfer], list[int], list[int]]:
        """Pin a slot for each expert; demand-load the absent ones. Returns (slots, copies to wait for, how each
        use was served: HIT / PREFETCH_HIT / LATE / MISS, the keys evicted to make room). The wave's keys are
        never victims of one another. On error nothing stays pinned."""
        slots, waits, classes, evicted_keys, pinned = [], [], [], [], frozenset(keys)
        policy, table, prefetched, streamed = self.policy, self.slots, self._prefetched, self._streamed
        try:
            for expert, key in zip(experts, keys):
                # the policy's victim, when it names one, goes first (the slot table then places the key in its
                # slot; else in a free slot or its own least recently used one)
                victim = policy.victim(key, now, pinned, None)
                if victim is not None and victim >= 0 and table.evict(victim):
                    self._evicted(victim)
                    evicted_keys.append(victim)
                slot, hit, evicted = table.acquire(key)
                slots.append(slot)
                policy.used(key, now)
                if evicted >= 0:
                    self._evicted(evicted)
                    evicted_keys.append(evicted)
                if hit:
                    if key in prefetched or key in streamed:
                        classes.append(self._classify_hit(layer, expert, key, slot, waits))
                    else:  # a plain hit, the common case: counted here
                        self.stats.hits += 1
                        classes.append(HIT)
                    continue
                self.stats.misses += 1
                classes.append(MISS)
                waits.append(self._copy(layer, expert, key, slot, DEMAND))
        except BaseException:
            self.forget(keys[: len(slots)])
            raise
        return slots, waits, classes, evicted_keys

    def wait(self, layer: int, waits: list[Transfer]) -> None:
        """Wait for a wave's copies; their host wait is the stall. A failed copy is redone once as a demand
        load; a second failure, or a copy that does not land within `copy_timeout_s`, raises an error naming
        the layer and expert (the caller then `forget`s the wave)."""
        for transfer in waits:
            self.stats.stall_seconds += self._wait(layer, transfer)

    def release(self, keys: list[int], slots: list[int], done: torch.cuda.Event | None) -> None:
        """Unpin a wave; `done` (CUDA) is recorded after the kernels that read its slots: a later copy into
        one of them waits for it."""
        if done is not None:
            for slot in slots:
                self._slot_free[slot] = done
        for key in keys:
            self.slots.release(key)

    def forget(self, keys: list[int]) -> None:
        """Undo an acquire whose slots may hold garbage: unpin and evict."""
        for key in keys:
            self.slots.release(key)
            if self.slots.evict(key):
                self.policy.forget(key)
                self._unseen(key)

    # -- prefetching -------------------------------------------------------------------------------
    def prefetch(self, layer: int, expert: int, distance: int, now: int, pinned: frozenset) -> int:
        """Start bringing `expert` of `layer` in for `distance` layer turns ahead, if it is neither resident
        nor in flight. Returns NOT_QUEUED when no copy was queued (resident, in flight, every expert it could
        displace is needed no later than this one (`predictive`), or every slot pinned), else the key it evicted
        (-1: none). `pinned`: keys of the wave being computed (never victims)."""
        key = layer * self.key_stride + expert
        if self.slots.lookup(key) >= 0:
            return NOT_QUEUED
        when, evicted = now + distance, -1
        victim = self.policy.victim(key, now, pinned, when)
        if victim is not None:  # the policy chose: evict it first (the slot table then reuses its slot)
            if victim < 0 or not self.slots.evict(victim):
                return NOT_QUEUED
            self._evicted(victim)
            evicted = victim
        slot, lru_evicted = self.slots.prefetch(key)
        if slot < 0:
            return NOT_QUEUED
        if lru_evicted >= 0:
            self._evicted(lru_evicted)
            evicted = lru_evicted
        self._start_prefetch(layer, expert, key, slot, distance, now)
        return evicted

    def stream(self, wanted: list[tuple[int, int, int]], now: int, pinned: frozenset, layer: int, limit: int,
               victim_of) -> int:
        """Bring `wanted` [(layer, expert, distance)] in, in that order (nearest need first), while the wave
        `pinned` of `layer` computes (runtime/prefill.py: a forward of many tokens); at most `limit` copies,
        stopping at the first that finds no room. `wanted` may reach into the next forward (an expert of a layer
        up to `layer`, needed at its turn there). A copy takes a free slot, else displaces
        `victim_of(key, now, distance, near, pinned, done)` (-1: none; `near`: the keys of the next layer and the
        wave, `done`: those of `layer` or before not pinned, least recently used first). A prediction does not
        withdraw a streamed copy. Returns the copies queued."""
        resident = self.slots.resident()  # (key, slot), least recently used first
        free = self.num_slots - len(resident)
        near = set(pinned).union(k for k, _ in resident if k // self.key_stride == layer + 1)
        done = [k for k, _ in resident if k // self.key_stride <= layer and k not in pinned]
        queued = 0
        for expert_layer, expert, distance in wanted:
            key = expert_layer * self.key_stride + expert
            if queued >= limit:
                break
            if self.slots.lookup(key) >= 0:  # resident or in flight
                self.policy.expect(key, now + distance, now)
                continue
            if free > 0:
                free -= 1
            else:
                victim = victim_of(key, now, distance, near, pinned, done)
                if victim < 0 or not self.slots.evict(victim):
                    break
                self._evicted(victim)
                self._unseen(victim)
            slot, _ = self.slots.prefetch(key)  # the slot just freed
            if slot < 0:
                break
            near.add(key)
            self._start_prefetch(expert_layer, expert, key, slot, distance, now)
            self._streamed.add(key)
            queued += 1
        return queued

    def expect(self, wanted: list[tuple[int, int, int]], now: int) -> None:
        """Predictions want these resident experts [(layer, expert, distance)]: `predictive` keeps them longer."""
        if self.policy.expects:
            self.policy.expect_many(wanted, self.key_stride, now)

    def withdraw(self, layer: int, expert: int) -> bool:
        """Cancel a prefetch a newer prediction contradicts, if its copy has not started; frees the slot."""
        key = layer * self.key_stride + expert
        transfer = self._prefetched.get(key)
        if (transfer is None or key in self._streamed or transfer.ready() or self.slots.pins(key)
                or not self.engine.cancel(transfer)):
            return False
        del self._prefetched[key]
        self.slots.evict(key)
        self.policy.forget(key)
        self.stats.bytes_to_device -= transfer.nbytes
        self.stats.cancelled_prefetches += 1
        return True

    def queued_prefetches(self) -> list[int]:
        """Distances (priorities) of the prefetch copies not finished yet: the link's backlog of predicted bytes
        (only the copies not seen landed are looked at; one used, evicted or withdrawn since is dropped)."""
        if not self._unlanded:
            return []
        prefetched, out = self._prefetched, []
        for key, transfer in list(self._unlanded.items()):
            if prefetched.get(key) is not transfer or transfer.ready():
                del self._unlanded[key]
            else:
                out.append(transfer.priority)
        return out

    def free_slots(self) -> int:
        """Slots holding no expert (a prefetch into one evicts nothing)."""
        return self.num_slots - self.slots.occupied()

    # -- internals ---------------------------------------------------------------------------------
    def _classify_hit(self, layer: int, expert: int, key: int, slot: int, waits: list) -> int:
        transfer = self._prefetched.pop(key, None)
        self._streamed.discard(key)
        if transfer is None:
            self.stats.hits += 1
            return HIT
        if transfer.error is not None:  # the prefetch failed: a demand load after all
            self.stats.misses += 1
            self.stats.failed_copies += 1
            logger.warning("prefetch of layer %d expert %d failed (%r); loading it on demand", layer, expert,
                           transfer.error)
            waits.append(self._copy(layer, expert, key, slot, DEMAND))
            return MISS
        if transfer.ready():
            self.stats.prefetch_hits += 1
            return PREFETCH_HIT
        self.stats.late_prefetches += 1
        self.engine.promote(transfer)  # the compute side waits for it now: before other prefetches
        waits.append(transfer)
        return LATE

    def _start_prefetch(self, layer: int, expert: int, key: int, slot: int, distance: int, now: int) -> None:
        self.policy.predicted(key, now + distance, now)
        self._prefetched[key] = self._unlanded[key] = self._copy(layer, expert, key, slot, distance)
        self.stats.prefetches += 1

    def _copy(self, layer: int, expert: int, key: int, slot: int, priority: int) -> Transfer:
        """Queue the copy of an expert into its slot. A submission that raises gives a `FailedTransfer`, handled
        like a copy that failed on the link. A plain row on an engine that copies by address (the native CPU engine)
        goes as two addresses from the layer's layout checked once, with little Python: a decode step runs it cold."""
        submit_at = self._submit_at
        if submit_at is not None:
            plain = self._plain[layer] if layer in self._plain else self._plain.setdefault(
                layer, plain_layout(self.store, self.pool, layer))
            if plain is not None:  # on the host, where compute is synchronous: no event guards the slot
                owners, src_base, row_bytes, nbytes = plain
                try:
                    transfer = submit_at(key, slot, self._pool_base + slot * self._slot_bytes,
                                         src_base + expert * row_bytes, nbytes, priority, owners)
                except Exception as e:  # noqa: BLE001 — reported where the copy is waited for
                    return FailedTransfer(key, slot, nbytes, priority, e)
                return self._submitted(transfer)
        src = self.store.expert(layer, expert)
        expand = self.store.expansion(layer)  # a compressed store's: expanded into the slot as it lands
        dst = self.pool[slot, : src.numel() if expand is None else expand.numel]
        try:
            transfer = self._engine.submit(key, slot, dst, src, priority, after=self._slot_free[slot], expand=expand)
        except Exception as e:  # noqa: BLE001 — reported where the copy is waited for
            return FailedTransfer(key, slot, src.numel() * src.element_size(), priority, e)
        return self._submitted(transfer)

    def _submitted(self, transfer: Transfer) -> Transfer:  # counted, and reported to the listeners
        self.stats.bytes_to_device += transfer.nbytes
        if self.events.listeners:
            self.events.copy_submitted(self.clock.step, self.clock.layer, transfer.key, transfer.priority, transfer)
        return transfer

    def _wait(self, layer: int, transfer: Transfer) -> float:
        expert, timeout = transfer.key - layer * self.key_stride, self.copy_timeout_s
        try:
            try:
                return transfer.wait(timeout)
            except CopyError as first:
                self.stats.failed_copies += 1
                logger.warning("copy of layer %d expert %d failed (%s); retrying", layer, expert, first)
                return self._copy(layer, expert, transfer.key, transfer.slot, DEMAND).wait(timeout)
        except CopyError as e:
            raise CopyError(f"layer {layer} expert {expert}: the copy into slot {transfer.slot} failed twice "
                            f"({e}); the model is unchanged, generate again once the cause is fixed") from e
        except TimeoutError as e:
            raise CopyTimeoutError(
                f"layer {layer} expert {expert}: its copy into slot {transfer.slot} did not land within "
                f"copy_timeout_s={timeout} s; the copy engine is stuck or the link far slower than expected"
            ) from e

    def _unseen(self, key: int) -> None:  # evicted where no prefetcher call is told: its next call is (`_plan`)
        if self.unseen_evictions is not None:
            self.unseen_evictions.append(key)

    def _evicted(self, key: int) -> None:
        """`key` lost its slot: a prefetched copy never used is wasted (or withdrawn if still queued)."""
        self.stats.evictions += 1
        self.policy.forget(key)
        self._streamed.discard(key)
        transfer = self._prefetched.pop(key, None)
        if transfer is None or transfer.error is not None:  # nothing, or nothing useful, landed
            return
        if not transfer.ready() and self.engine.cancel(transfer):
            self.stats.bytes_to_device -= transfer.nbytes
            self.stats.cancelled_prefetches += 1
        else:
            self.stats.wasted_bytes += transfer.nbytes

    def reset_stats(self) -> None:
        self.stats = OffloadStats()
        self.slots.reset_counters()
        self.engine.discard_stalls()  # stalls of copies before the reset are not this period's
