"""The per-model runtime: host store + device slot pool + slot manager + copy engine + counters.

One `Offloader` is attached to each offloaded model. `run_experts` is the per-layer hot path:
acquire slots for the experts the router chose (demand-loading the absent ones), compute with the
model's own kernels on the slots, release.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..config import OffloadConfig
from ..errors import CopyError, CopyTimeoutError
from ..models.base import MoELayer
from ..stats import OffloadStats
from . import waves
from .cache import make_slot_manager
from .experts import SlotView, allocate_pool, make_offloaded_forward, slot_range, to_device
from .policy import NextUsePolicy
from .store import ExpertPacking, HostExpertStore
from .transfer import DEMAND, FailedTransfer, make_copy_engine

logger = logging.getLogger(__name__)


class Offloader:
    """Owns everything an offloaded model needs; built by `m2r2_moe.offload`."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], config: OffloadConfig, num_slots: int,
                 adapter, store=None):
        self.config = config
        self.device = config.resolved_device()
        self.layers = layers
        self.adapter = adapter  # the family's MoEAdapter
        self.original_device = next(model.parameters()).device
        self.num_experts = [int(layer.experts.num_experts) for layer in layers]
        self.key_stride = max(self.num_experts)
        self.packings = [_packing(layer) for layer in layers]
        dtype = self.packings[0].dtype
        if any(p.dtype != dtype for p in self.packings):
            raise TypeError("all MoE layers must keep their experts in one dtype")
        self.num_slots = num_slots
        self.expert_bytes = [p.nbytes for p in self.packings]  # bytes one expert transfer moves, per layer
        if store is None:  # else a pre-built store with HostExpertStore's interface (from_pretrained's disk tier)
            store = HostExpertStore(self.packings, self.num_experts, config.resolved_pin_memory())
        self.store = store
        slot_numel = max(p.numel for p in self.packings)
        # zeros, not empty: a kernel may read a never-filled slot in batched_mm's clamped sentinel rows (x 0 weight)
        self.pool = allocate_pool(num_slots, slot_numel, dtype, self.device)  # [S, numel]
        self.views = [SlotView(layer.experts, p.views(self.pool), num_slots) for layer, p in zip(layers, self.packings)]
        self.kernels = [type(layer.experts).forward for layer in layers]
        # the kernel the model dispatches to (read once: config attribute access is slow in transformers 5)
        self.kernel_names = [getattr(getattr(layer.experts, "config", None), "_experts_implementation", None)
                             for layer in layers]
        self.slots = make_slot_manager(num_slots)
        self.engine = make_copy_engine(self.device, config.link_gbps, config.link_latency_us)
        self.stats = OffloadStats()
        self._slot_free: list[torch.cuda.Event | None] = [None] * num_slots  # CUDA: last compute reading the slot
        self._moved = 0  # layers whose weights live in the store (for rollback)
        self._prefetched: dict[int, object] = {}  # key -> transfer of a prefetched expert not used yet
        self._step = 0  # forwards seen (a decode step is one forward)
        self._layer_now = 0  # the MoE layer being computed
        self.layer_seconds = 0.0  # running estimate of one layer's compute time (host clock, stalls excluded)
        self._last_call = (-1, 0.0, 0.0, 0)  # (layer, perf_counter, stall seconds, tokens) at the previous call
        # the `predictive` policy's next-use estimates (runtime/policy.py); `lru` leaves eviction to the slot manager
        self.policy = NextUsePolicy(len(layers)) if config.policy == "predictive" else None
        self._wave_keys: frozenset[int] = frozenset()  # keys of the wave being acquired: never victims
        self.top_k = adapter.top_k(model)  # sizes predicted sets
        self.prefetcher = None  # set by attach_predictor

    # -- installing and removing -----------------------------------------------------------------
    def install(self, model: nn.Module, fill_store=None) -> None:
        """Move expert weights into the store, free them from the model, swap the experts' forward, move
        the rest of the model to the device. All or nothing: on error the model is restored.

        `fill_store(store)` (from_pretrained): the store is filled from a checkpoint instead, the model's
        expert params (meta) are replaced by empty CPU tensors, and `remove_offload` later gives back a
        CPU model, as if it had been loaded with transformers and then offloaded."""
        try:
            if fill_store is not None:
                fill_store(self.store)
                for layer in self.layers:  # meta params cannot take `.data = cpu_tensor`: replace them
                    for name in layer.param_names:
                        p = getattr(layer.experts, name)
                        setattr(layer.experts, name, nn.Parameter(torch.empty(0, dtype=p.dtype), p.requires_grad))
                self._moved = len(self.layers)
                self.original_device = torch.device("cpu")
            else:
                for i, layer in enumerate(self.layers):
                    params = {n: getattr(layer.experts, n) for n in layer.param_names}
                    self.store.fill_layer(i, {n: p.data for n, p in params.items()})
                    for p in params.values():
                        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                    self._moved = i + 1
            for i, layer in enumerate(self.layers):
                layer.experts.forward = make_offloaded_forward(self, i)
            if self.device != self.original_device:
                model.to(self.device)
        except BaseException:
            self.uninstall(model)
            raise

    def attach_predictor(self, predictor) -> None:
        """Prefetch with `predictor` (a `m2r2_moe.predict.Predictor`); `None` detaches."""
        from .prefetcher import Prefetcher

        if self.prefetcher is not None:
            self.prefetcher.remove()
        self.prefetcher = (None if predictor is None or predictor.name == "none"
                           else Prefetcher(self, predictor, min_prob=self.config.prefetch_min_prob))

    def reset_sequence(self) -> None:
        """A new prompt starts: predictors forget per-sequence state."""
        if self.prefetcher is not None:
            self.prefetcher.predictor.reset()

    def uninstall(self, model: nn.Module) -> None:
        """Give the model its weights and forwards back, bit for bit; release the runtime's resources."""
        self.attach_predictor(None)
        self.engine.close()
        for layer in self.layers:
            layer.experts.__dict__.pop("forward", None)
        if self.device != self.original_device:
            model.to(self.original_device)
        for i in range(self._moved):
            tensors = self.store.layer_tensors(i)
            for name in self.layers[i].param_names:
                getattr(self.layers[i].experts, name).data = tensors[name]
        self._moved = 0

    # -- the per-layer hot path --------------------------------------------------------------------
    def run_experts(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, K] → [T, H]."""
        if layer == 0:
            self.stats.tokens += hidden_states.shape[0]
            self._step += 1
        self._layer_now = layer
        self._time_layer(layer, hidden_states.shape[0])
        self.stats.layer_calls += 1
        # Host sync on CUDA: the set of experts decides which copies to issue (paid once per layer).
        needed = torch.unique(top_k_index).tolist()
        self._routing = top_k_index  # the prefetcher looks ahead once per layer call, at its first wave
        if not needed:
            return torch.zeros_like(hidden_states)
        tokens, top_k = top_k_index.shape
        if len(needed) <= self.num_slots and waves.direct_is_exact(self.kernel_names[layer], tokens, top_k):
            def compute(view, table):
                return self.kernels[layer](view, hidden_states, table[top_k_index], top_k_weights)

            return self.run_wave(layer, needed, compute)
        return waves.run_pairs(self, layer, needed, hidden_states, top_k_index, top_k_weights)

    def _time_layer(self, layer: int, tokens: int) -> None:
        """Update `layer_seconds` from the time since the previous layer's call, less its stalls (the
        prefetcher weighs a copy's transfer time against it). A forward of another size (decode after a
        prefill) starts the estimate afresh: a prefill's layer times say nothing about a decode step's."""
        now, stall = time.perf_counter(), self.stats.stall_seconds
        last_layer, last_time, last_stall, last_tokens = self._last_call
        if tokens != last_tokens:
            self.layer_seconds = 0.0  # unknown until this size's first sample: the prefetcher then uses its floor
        elif layer == last_layer + 1:
            sample = max(now - last_time - (stall - last_stall), 0.0)
            self.layer_seconds = sample if not self.layer_seconds else 0.9 * self.layer_seconds + 0.1 * sample
        self._last_call = (layer, now, stall, tokens)

    def run_wave(self, layer: int, wave: list[int], compute) -> torch.Tensor:
        """Acquire the wave's experts, run `compute(view, table)` on their slots, release. `view` stands in
        for the experts module with as few slots as possible (grouped_mm's per-expert loop costs per slot
        seen); `table [E]` maps an expert id of the wave to its index in `view` (out of range elsewhere)."""
        self.stats.waves += 1
        keys = [layer * self.key_stride + e for e in wave]
        slots = self._acquire(layer, wave, keys, self._routing)
        self._routing = None
        try:
            lo, hi, step = slot_range(slots)
            view = self.views[layer].window(lo, hi, step)
            table = [view.num_experts] * self.num_experts[layer]
            for expert, slot in zip(wave, slots):
                table[expert] = (slot - lo) // step
            out = compute(view, to_device(table, self.device))
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()  # on the compute stream, after the kernels reading these slots
                for slot in slots:
                    self._slot_free[slot] = done
        finally:
            for key in keys:
                self.slots.release(key)
        return out

    def _acquire(self, layer: int, wave: list[int], keys: list[int], top_k_index=None) -> list[int]:
        """Pin a slot for each expert of the wave; demand-load the absent ones; let the prefetcher look
        ahead (the wave is pinned, its loads queued first); wait for the wave's copies."""
        slots, waits = [], []
        now = self.now(layer)
        self._wave_keys = frozenset(keys)
        try:
            for expert, key in zip(wave, keys):
                if self.policy is not None:
                    self._make_room(key, now)
                slot, hit, evicted = self.slots.acquire(key)
                slots.append(slot)
                if self.policy is not None:
                    self.policy.used(key, now)
                if evicted >= 0:
                    self._evicted(evicted)
                if hit:
                    self._classify_hit(layer, expert, key, slot, waits)
                    continue
                self.stats.misses += 1
                waits.append(self._copy(layer, expert, key, slot, DEMAND))
            if top_k_index is not None and self.prefetcher is not None:  # once per layer call
                self._look_ahead(layer, top_k_index, len(wave))
            for transfer in waits:
                self.stats.stall_seconds += self._wait(layer, transfer)
        except BaseException:
            for key in keys[: len(slots)]:
                self._forget(key)
            raise
        return slots

    def _classify_hit(self, layer: int, expert: int, key: int, slot: int, waits: list) -> None:
        transfer = self._prefetched.pop(key, None)
        if transfer is None:
            self.stats.hits += 1
        elif getattr(transfer, "error", None) is not None:  # the prefetch failed: a demand load after all
            self.stats.misses += 1
            self.stats.failed_copies += 1
            logger.warning("prefetch of layer %d expert %d failed (%r); loading it on demand", layer, expert,
                           transfer.error)
            waits.append(self._copy(layer, expert, key, slot, DEMAND))
        elif transfer.ready():
            self.stats.prefetch_hits += 1
        else:
            self.stats.late_prefetches += 1
            promote = getattr(self.engine, "promote", None)
            if promote is not None:
                promote(transfer)  # the compute side waits for it now: run it before other prefetches
            waits.append(transfer)

    def _copy(self, layer: int, expert: int, key: int, slot: int, priority: int):
        """Queue the copy of an expert into its slot. A submission that raises gives a `FailedTransfer`,
        handled like a copy that failed on the link (a failed prefetch is redone on demand, a failed
        demand load once more)."""
        src = self.store.expert(layer, expert)
        try:
            transfer = self.engine.submit(key, slot, self.pool[slot, : src.numel()], src, priority,
                                          after=self._slot_free[slot])
        except Exception as e:  # noqa: BLE001 — reported where the copy is waited for
            return FailedTransfer(key, slot, src.numel() * src.element_size(), priority, e)
        self.stats.bytes_to_device += transfer.nbytes
        return transfer

    def _wait(self, layer: int, transfer) -> float:
        """Wait for a copy of this layer's wave: host seconds waited. A failed copy is redone once as a
        demand load; a second failure, or a copy that does not land within `copy_timeout_s`, raises an
        error naming the layer and expert (the wave's slots are then dropped by `_acquire`)."""
        expert, timeout = transfer.key - layer * self.key_stride, self.config.copy_timeout_s
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

    def _look_ahead(self, layer: int, top_k_index: torch.Tensor, pinned: int) -> None:
        """Let the prefetcher predict and issue copies. A predictor that raises is switched off with one
        warning (prefetching only ever changes speed, never outputs) and counted in the stats."""
        try:
            self.prefetcher.on_layer(layer, top_k_index, pinned=pinned)
        except Exception as e:  # noqa: BLE001 — any predictor bug: fall back to on-demand loading
            name = self.prefetcher.predictor.name
            self.stats.predictor_failures += 1
            self.attach_predictor(None)
            logger.warning("predictor %r raised at layer %d (%r); prefetching is off for this model from now "
                           "on, outputs are unaffected", name, layer, e)

    def prefetch(self, layer: int, expert: int, priority: int) -> bool:
        """Start bringing `expert` of MoE layer `layer` in, if it is neither resident nor in flight.
        Returns whether a copy was queued: with the `predictive` policy not when every expert it could
        displace is needed no later than this one."""
        key = layer * self.key_stride + expert
        if self.slots.lookup(key) >= 0:
            return False
        if self.policy is not None:
            now = self.now(self._layer_now)
            when = now + priority  # a prefetch's priority is its target's distance in layers
            if not self._make_room(key, now, needed_at=when):
                return False
        slot, evicted = self.slots.prefetch(key)
        if slot < 0:
            return False
        if evicted >= 0:
            self._evicted(evicted)
        if self.policy is not None:
            self.policy.predicted(key, when, now)
        self._prefetched[key] = self._copy(layer, expert, key, slot, priority)
        self.stats.prefetches += 1
        return True

    def queued_prefetches(self) -> int:
        """Prefetch copies not finished yet (the link's backlog of predicted bytes)."""
        return sum(1 for t in self._prefetched.values() if not t.ready())

    def withdraw(self, layer: int, expert: int) -> bool:
        """Cancel a prefetch a newer prediction contradicts, if its copy has not started; the slot is freed.
        Returns whether it was withdrawn."""
        key = layer * self.key_stride + expert
        transfer = self._prefetched.get(key)
        cancel = getattr(self.engine, "cancel", None)
        if transfer is None or cancel is None or transfer.ready() or self.slots.pins(key) or not cancel(transfer):
            return False
        del self._prefetched[key]
        self.slots.evict(key)
        if self.policy is not None:
            self.policy.forget(key)
        self.stats.bytes_to_device -= transfer.nbytes
        self.stats.cancelled_prefetches += 1
        return True

    def expect(self, layer: int, expert: int, distance: int) -> None:
        """A prediction wants a resident expert of `layer` in `distance` layer turns (the `predictive`
        policy then keeps it over experts needed later)."""
        key = layer * self.key_stride + expert
        if self.policy is not None and key in self.policy.next_use:
            now = self.now(self._layer_now)
            self.policy.predicted(key, now + distance, now)

    def now(self, layer: int) -> int:
        """The current time in layer turns (runtime/policy.py)."""
        return self._step * len(self.layers) + layer

    def _make_room(self, key: int, now: int, needed_at: int | None = None) -> bool:
        """`predictive` policy: when the pool is full and `key` is absent, evict the policy's victim so
        the slot manager places `key` in the freed slot. False when no expert may be evicted."""
        if key in self.policy.next_use or len(self.policy.next_use) < self.num_slots:
            return True
        victim = self.policy.victim(now, self._wave_keys, needed_at)
        if victim < 0 or not self.slots.evict(victim):
            return False
        self._evicted(victim)
        return True

    def _evicted(self, key: int) -> None:
        """`key` lost its slot: a prefetched copy never used is wasted (or withdrawn if still queued)."""
        self.stats.evictions += 1
        if self.policy is not None:
            self.policy.forget(key)
        transfer = self._prefetched.pop(key, None)
        if transfer is None or getattr(transfer, "error", None) is not None:  # nothing, or nothing useful, landed
            return
        cancel = getattr(self.engine, "cancel", None)
        if cancel is not None and not transfer.ready() and cancel(transfer):
            self.stats.bytes_to_device -= transfer.nbytes
            self.stats.cancelled_prefetches += 1
        else:
            self.stats.wasted_bytes += transfer.nbytes

    def _forget(self, key: int) -> None:
        """Undo an acquire whose slot may hold garbage: unpin and evict it."""
        self.slots.release(key)
        if self.slots.evict(key) and self.policy is not None:
            self.policy.forget(key)

    def collect_device_stalls(self) -> None:
        self.stats.stall_seconds += self.engine.drain_stall_seconds()

    def reset_stats(self) -> None:
        self.stats = OffloadStats()
        self.slots.reset_counters()


def _packing(layer: MoELayer) -> ExpertPacking:
    params = [getattr(layer.experts, n) for n in layer.param_names]
    return ExpertPacking.from_shapes(layer.param_names, [tuple(p.shape[1:]) for p in params], params[0].dtype)
