"""The per-model runtime: lifecycle (install, remove) and the per-layer hot path.

One `Offloader` is attached to each offloaded model. It owns the host store, the device slot pool, the copy
engine, the expert cache (`runtime/expert_cache.py`: slots, eviction, copies in flight, counters), the layer
clock, the runtime's event listeners and, when a predictor drives prefetching, the prefetcher. `run_experts`
is what every MoE layer's experts module calls instead of its own forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import RuntimePlan
from ..models.base import MoELayer
from . import waves
from .clock import LayerClock
from .events import RuntimeEvents
from .expert_cache import ExpertCache
from .experts import IndexTables, SlotView, allocate_pool, make_offloaded_forward, slot_range, to_device
from .phases import PhaseMeter
from .policy import make_policy
from .prefill import PrefillStream
from .store import ExpertPacking, HostExpertStore
from .engines import make_copy_engine

logger = logging.getLogger(__name__)


class Offloader:
    """Owns everything an offloaded model needs; built by `m2r2_moe.offload`."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], plan: RuntimePlan, adapter, store=None):
        self.plan = plan
        self.device = plan.device
        self.layers = layers
        self.adapter = adapter  # the family's MoEAdapter
        self.original_device = next(model.parameters()).device
        self.num_experts = [int(layer.experts.num_experts) for layer in layers]
        self.key_stride = max(self.num_experts)
        self.packings = [_packing(layer) for layer in layers]
        dtype = self.packings[0].dtype
        if any(p.dtype != dtype for p in self.packings):
            raise TypeError("all MoE layers must keep their experts in one dtype")
        self.num_slots = num_slots = plan.num_slots
        if store is None:  # else a pre-built store with HostExpertStore's interface (disk tier, compressed)
            store = HostExpertStore(self.packings, self.num_experts, plan.pin_memory)
        self.store = store
        self.expert_bytes = store.link_bytes  # bytes one expert transfer moves, per layer
        slot_numel = max(p.numel for p in self.packings)
        # zeros, not empty: a kernel may read a never-filled slot in batched_mm's clamped sentinel rows (x 0 weight)
        self.pool = allocate_pool(num_slots, slot_numel, dtype, self.device)  # [S, numel]
        self.views = [SlotView(layer.experts, p.views(self.pool), num_slots) for layer, p in zip(layers, self.packings)]
        self.kernels = [type(layer.experts).forward for layer in layers]
        self.index_tables = IndexTables(self.device)  # decode's [1, K] slot indices, made once each
        # the kernel the model dispatches to (read once: config attribute access is slow in transformers 5)
        self.kernel_names = [getattr(getattr(layer.experts, "config", None), "_experts_implementation", None)
                             for layer in layers]
        self.link = (plan.link_gbps, plan.link_latency_us)  # the emulated link (CPU), for a new engine
        self.engine = make_copy_engine(self.device, *self.link)
        self.clock = LayerClock(len(layers))
        self.events = RuntimeEvents()
        self.cache = ExpertCache(num_slots, self.key_stride, make_policy(plan.policy, len(layers), num_slots),
                                 self.engine, store, self.pool, plan.copy_timeout_s, self.events, self.clock)
        self._moved = 0  # layers whose weights live in the store (for rollback)
        self.top_k = adapter.top_k(model)  # sizes predicted sets
        self.prefill = PrefillStream(self.cache, self.clock, self.num_experts, self.expert_bytes, self.top_k)
        self.phases = PhaseMeter(self.cache, len(layers))  # prefill and decode counted apart
        self.usage = None  # a warm.UsageCounter, fed each layer call's routing (set by attach)
        self.prefetcher = None  # set by attach_predictor

    @property
    def stats(self):
        """The counters (`OffloadStats`), kept by the expert cache."""
        return self.cache.stats

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
        self.prefetcher = (None if predictor is None or predictor.name == "none" else
                           Prefetcher(predictor, self.cache, self.clock, self.engine, self.layers, self.top_k,
                                      self.expert_bytes[0], min_prob=self.plan.prefetch_min_prob))

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
        """hidden_states [T, H], top_k_index / top_k_weights [T, K] → [T, H]: route, acquire, look ahead,
        compute on the slots, release."""
        tokens, top_k = top_k_index.shape
        stats = self.cache.stats  # read once: this runs at every layer of every token
        self.clock.tick(layer, tokens, stats.stall_seconds)
        if layer == 0:
            stats.tokens += tokens
        stats.layer_calls += 1
        self.phases.started(layer, tokens)
        listening = bool(self.events.listeners)
        if listening:
            self.events.layer_started(self.clock.step, layer, tokens)
        kernel, name = self.kernels[layer], self.kernel_names[layer]
        if tokens == 1 and waves.direct_is_exact(name, 1, top_k):  # decode at batch 1: the K experts read once,
            # the slot indices built on the host
            # host sync on CUDA: the set of experts decides which copies to issue (paid once per layer)
            chosen = top_k_index.tolist()[0]
            if self.usage is not None:  # counted on the host: the routing is read already
                self.usage.count_host(layer, chosen)
            out = self.run_wave(layer, sorted(set(chosen)), lambda view, slot_of: kernel(
                view, hidden_states, self.index_tables.get(tuple([slot_of[e] for e in chosen])), top_k_weights),
                routing=top_k_index)
        else:
            if self.usage is not None:
                self.usage.count(layer, top_k_index)
            needed = self.prefill.route(layer, top_k_index)  # host sync on CUDA, as above
            if not needed:
                out = torch.zeros_like(hidden_states)
            elif len(needed) <= self.num_slots and waves.direct_is_exact(name, tokens, top_k):
                out = self.run_wave(layer, needed, lambda view, slot_of: kernel(
                    view, hidden_states, self.table(layer, view, slot_of)[top_k_index], top_k_weights),
                    routing=top_k_index)
            else:  # more experts than slots, or a kernel whose row order needs the pair-by-pair path
                out = waves.run_pairs(self, layer, needed, hidden_states, top_k_index, top_k_weights)
        if listening:
            self.events.layer_finished(self.clock.step, layer)
        self.phases.finished(layer)
        return out

    def run_wave(self, layer: int, wave: list[int], compute, routing: torch.Tensor | None = None) -> torch.Tensor:
        """Acquire the wave's experts, let the prefetcher look ahead (once per layer call: `routing` is the
        layer's `top_k_index` on its first wave), wait for the copies, run `compute(view, slot_of)` on the
        slots, release. `view` stands in for the experts module with as few slots as possible (grouped_mm's
        per-expert loop costs per slot seen); `slot_of` maps each expert of the wave to its index in `view`."""
        self.cache.stats.waves += 1
        keys = self.cache.keys(layer, wave)
        slots, waits, served, evicted = self.cache.acquire(layer, wave, keys, self.clock.now(layer))
        prefetcher = self.prefetcher  # a quiet one (a decode step that predicts nowhere) is not called after layer 0
        look_ahead = routing is not None and prefetcher is not None and not (layer and prefetcher.quiet)
        if evicted and routing is None and prefetcher is not None:  # a layer's later waves: told at the next call
            self.cache.unseen_evictions.extend(evicted)  # (a quiet layer's are not: the planner resyncs after them)
        # On CPU the prediction runs before the kernel, so that its copies start a layer's compute earlier; on
        # CUDA after the kernels are queued, so that the host's prediction overlaps the device's compute.
        early = look_ahead and self.device.type != "cuda"
        try:
            self.prefill.acquired(layer, keys)  # a forward of many tokens: the next layers' experts stream in
            if early:  # the wave is pinned, its demand loads queued first
                self._look_ahead(layer, routing, keys, served, evicted)
            if waits:
                self.cache.wait(layer, waits)
        except BaseException:
            self.cache.forget(keys)
            raise
        done = None
        try:
            lo, hi, step = slot_range(slots)
            view = self.views[layer].window(lo, hi, step)
            out = compute(view, {expert: (slot - lo) // step for expert, slot in zip(wave, slots)})
            done = self.engine.compute_done()  # CUDA: after the kernels reading these slots
        finally:
            self.cache.release(keys, slots, done)
        if look_ahead and not early:  # a copy into one of the wave's slots waits for `done`
            self._look_ahead(layer, routing, keys, served, evicted)
        return out

    def table(self, layer: int, view: SlotView, slot_of: dict[int, int]) -> torch.Tensor:
        """`[E]` on the device: expert id -> its index in `view` (`view.num_experts`, out of range, for the
        experts not in it)."""
        table = [view.num_experts] * self.num_experts[layer]
        for expert, index in slot_of.items():
            table[expert] = index
        return to_device(table, self.device)

    def _look_ahead(self, layer: int, top_k_index: torch.Tensor, keys: list[int], served: list[int],
                    evicted: list[int]) -> None:
        """Let the prefetcher predict and issue copies (`keys`: the wave's, pinned; `served`: how each of their
        uses was served, the outcome of earlier predictions; `evicted`: what their demand loads displaced). A
        predictor that raises is switched off with one warning (prefetching only ever changes speed, never
        outputs) and counted in the stats."""
        try:
            self.prefetcher.on_layer(layer, top_k_index, keys, served, evicted)
        except Exception as e:  # noqa: BLE001 — any predictor bug: fall back to on-demand loading
            name = self.prefetcher.predictor.name
            self.stats.predictor_failures += 1
            self.attach_predictor(None)
            logger.warning("predictor %r raised at layer %d (%r); prefetching is off for this model from now "
                           "on, outputs are unaffected", name, layer, e)

    def replace_engine(self, engine) -> None:
        """Copy with `engine` from now on (a `CopyEngine`; tests script copy arrival with one); the old one is
        closed once its queued copies are done."""
        self.engine.close()
        self.engine = self.cache.engine = engine
        if self.prefetcher is not None:
            self.prefetcher.engine = engine

    # -- counters ----------------------------------------------------------------------------------
    def collect_device_stalls(self) -> None:
        self.stats.stall_seconds += self.engine.drain_stall_seconds()
        self.phases.collect_device(self.engine)
        self.stats.expand_seconds += self.store.drain_expand_seconds()

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        self.store.drain_expand_seconds()  # expansions before the reset are not this period's


def _packing(layer: MoELayer) -> ExpertPacking:
    params = [getattr(layer.experts, n) for n in layer.param_names]
    return ExpertPacking.from_shapes(layer.param_names, [tuple(p.shape[1:]) for p in params], params[0].dtype)
