"""The online on/off guard (runtime/onoff.py): decode steps timed per arm, the faster arm kept, the other probed."""

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.runtime.onoff import OnOff


def drive(guard: OnOff, seconds, steps: int) -> list[bool]:
    """Run `steps` decode steps; a step with prefetching on takes seconds(True), off seconds(False)."""
    now, arms = 0.0, []
    for _ in range(steps):
        arm = guard.step(now, decode=True)
        arms.append(arm)
        now += seconds(arm)
    return arms


def share_on(arms: list[bool]) -> float:
    return sum(arms) / len(arms)


def test_both_arms_are_measured_first_then_the_faster_is_kept():
    guard = OnOff(block=4, probe=8, settle=1)
    arms = drive(guard, lambda on: 0.010 if on else 0.012, 4 * 40)
    assert arms[:4] == [True] * 4 and arms[4:8] == [False] * 4  # one block of each
    assert share_on(arms[8:]) > 0.8  # on is faster: kept, off only probed
    assert not all(arms[8:])  # ... and probed
    guard = OnOff(block=4, probe=8, settle=1)
    arms = drive(guard, lambda on: 0.014 if on else 0.012, 4 * 40)
    assert share_on(arms[8:]) < 0.2 and any(arms[8:])  # prefetching slower: off, on probed now and then


def test_prefetching_stays_on_unless_off_is_faster_by_the_margin():
    """Block-to-block noise must not switch off a predictor: off wins only by more than `margin`."""
    guard = OnOff(block=4, probe=8, settle=1, margin=0.03)
    arms = drive(guard, lambda on: 0.0122 if on else 0.012, 4 * 40)  # on 1.7 % slower: within the margin
    assert share_on(arms[8:]) > 0.8
    guard = OnOff(block=4, probe=8, settle=1, margin=0.03)
    arms = drive(guard, lambda on: 0.0125 if on else 0.012, 4 * 40)  # on 4 % slower: off
    assert share_on(arms[8:]) < 0.2


def test_no_off_block_while_the_planner_vouches():
    """While the planner's balance vouches (saved > VOUCH x spent), every block runs with prefetching on, even
    when off would time faster; once it stops vouching the arms are compared again."""
    guard = OnOff(block=4, probe=8, settle=1)
    now, arms = 0.0, []
    for i in range(4 * 20):
        arm = guard.step(now, decode=True, vouched=i < 40)
        arms.append(arm)
        now += 0.010 if arm else 0.008
    assert all(arms[:40])  # every block chosen while vouched ran with prefetching on
    assert arms[40:44] == [False] * 4 and share_on(arms[48:]) < 0.3  # then off was measured, and is faster


def test_a_change_of_regime_is_followed():
    guard = OnOff(block=4, probe=4, memory=2, settle=1)
    slow_on = lambda on: 0.014 if on else 0.012  # noqa: E731
    fast_on = lambda on: 0.008 if on else 0.012  # noqa: E731
    drive(guard, slow_on, 4 * 20)
    assert guard.choose() is False
    arms = drive(guard, fast_on, 4 * 30)
    assert share_on(arms[-40:]) > 0.6


def test_the_settling_steps_of_a_block_and_prompt_forwards_are_not_samples():
    guard = OnOff(block=4, probe=8, settle=1)
    now = 0.0
    for i in range(4):  # the on block: its first step (after a slow switch) is not timed
        guard.step(now, decode=True)
        now += 1.0 if i == 0 else 0.010
    assert guard.step(now, decode=False) is True  # a prompt's forward: prefetching on, and not a sample
    now += 5.0
    guard.step(now, decode=True)  # the next block begins
    assert list(guard.blocks[True]) == [pytest.approx(0.010)]


def _offloaded_builtin(new_tokens: int):
    """The built-in model's greedy continuation of a short prompt, then the model offloaded (gate predictor, a
    slow emulated link): (model, a function generating the same continuation again, the reference tokens)."""
    model, tok = m2r2_moe.load_builtin()
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)

    reference = generate()
    m2r2_moe.offload(model, device="cpu", cache_experts=24, predictor="gate", link_gbps=0.5)
    return model, generate, reference


def test_an_offloaded_model_measures_both_arms_and_stays_lossless(monkeypatch):
    from m2r2_moe.runtime import prefetcher

    monkeypatch.setattr(prefetcher, "VOUCH", float("inf"))  # the planner never vouches: both arms are measured
    model, generate, reference = _offloaded_builtin(72)
    try:
        out = generate()
        guard = m2r2_moe.get_offloader(model).prefetcher.onoff
        assert torch.equal(out, reference)
        assert guard.blocks[True] and guard.blocks[False]  # 71 decode steps: blocks of both arms were timed
    finally:
        m2r2_moe.remove_offload(model)


def test_the_off_arm_reads_no_residual_and_runs_no_admission():
    model, generate, reference = _offloaded_builtin(12)
    try:
        offloader = m2r2_moe.get_offloader(model)
        prefetcher = offloader.prefetcher
        prefetcher.onoff.step = lambda *args: False  # every forward runs the off arm
        reads = []
        free_slots = offloader.cache.free_slots
        offloader.cache.free_slots = lambda: reads.append(1) or free_slots()
        hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
        on_hooks = hooks()
        assert torch.equal(generate(), reference)
        # layer 0's residual is taken before the forward's arm is chosen (at its experts call); no other
        assert not prefetcher.tap.residuals_wanted and all(r is None for r in prefetcher.tap.residual[1:])
        assert not reads and m2r2_moe.stats(model).decode.prefetches == 0
        # the residual hooks are off the model (a hooked module takes torch's slower call path even when idle)
        assert hooks() == on_hooks - len(prefetcher.tap.layers)
        prefetcher.onoff.step = lambda *args: True  # and back on: the tap reads again, admission runs
        assert torch.equal(generate(), reference)
        assert prefetcher.tap.residuals_wanted and all(r is not None for r in prefetcher.tap.residual) and reads
        assert hooks() == on_hooks
    finally:
        m2r2_moe.remove_offload(model)
    assert hooks() == 0  # removing the offload takes every hook off


def test_an_idle_decode_step_still_shows_every_layer_to_a_predictor_that_observes():
    """Off steps skip all of the prefetcher's bookkeeping, except what a predictor that learns from the routing
    (history) is shown: every layer's experts, and the end of each forward."""
    model = tiny_mixtral(layers=4)
    m2r2_moe.offload(model, device="cpu", cache_experts=8, predictor="history", link_gbps=1.0)
    try:
        prefetcher = m2r2_moe.get_offloader(model).prefetcher
        prefetcher.onoff.step = lambda *args: False
        seen, observe, advance = [], prefetcher.predictor.observe, prefetcher.predictor.advance
        prefetcher.predictor.observe = lambda layer, chosen: seen.append(layer) or observe(layer, chosen)
        prefetcher.predictor.advance = lambda tokens: seen.append(("advance", tokens)) or advance(tokens)
        ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert seen == [0, 1, 2, 3, ("advance", 5)] + [0, 1, 2, 3, ("advance", 1)] * 3
    finally:
        m2r2_moe.remove_offload(model)


def test_the_hot_path_calls_a_quiet_prefetcher_only_at_the_first_layer():
    """An off decode step of a predictor that learns nothing from the routing (gate): the hot path calls the
    prefetcher at layer 0 only (where the step's arm is chosen); the prompt's forward and on steps call every layer."""
    model = tiny_mixtral(layers=4)
    m2r2_moe.offload(model, device="cpu", cache_experts=8, predictor="gate", link_gbps=1.0)
    try:
        prefetcher = m2r2_moe.get_offloader(model).prefetcher
        calls, on_layer, arms = [], prefetcher.on_layer, iter([False, False, True])
        prefetcher.onoff.step = lambda now, decode, vouched=False: True if not decode else next(arms)
        prefetcher.on_layer = lambda layer, *args: calls.append(layer) or on_layer(layer, *args)

        class EveryLayer:  # the planner, never backing off (on this random model its balance may): on steps predict
            every = 1

            def __getattr__(self, name):
                return getattr(planner, name)

        planner, prefetcher.planner = prefetcher.planner, EveryLayer()
        ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert calls == [0, 1, 2, 3] + [0] + [0] + [0, 1, 2, 3]  # the prompt, two off steps, one on step
        assert not prefetcher.quiet
    finally:
        m2r2_moe.remove_offload(model)


def test_the_off_arm_leaves_the_planner_alone_and_resyncs_it_when_prefetching_resumes():
    """While prefetching is off a decode step costs the planner nothing (no per-layer call); when it resumes, the
    planner's mirror is rebuilt from the cache's keys and the predictions made before the gap are dropped."""
    model, generate, reference = _offloaded_builtin(12)
    try:
        offloader = m2r2_moe.get_offloader(model)
        prefetcher = offloader.prefetcher
        planner = prefetcher.planner
        told, resyncs = [], []

        class Watch:  # the planner, with its per-layer calls and resyncs recorded
            def __getattr__(self, name):
                return getattr(planner, name)

            def layer(self, *args):
                told.append(args[1])  # decode or not
                return planner.layer(*args)

            def resync(self, resident):
                resyncs.append((sorted(resident), sorted(k for k, _ in offloader.cache.slots.resident())))
                planner.resync(resident)

        prefetcher.planner = Watch()
        prefetcher.onoff.step = lambda now, decode, vouched=False: not decode  # decode steps off, prompts on
        assert torch.equal(generate(), reference)
        assert told and not any(told)  # the prompt's layers only: no decode step reached the planner
        assert not resyncs
        prefetcher.onoff.step = lambda *args: True
        assert torch.equal(generate(), reference)
        assert any(told)  # decode steps are told again ...
        assert len(resyncs) == 1 and resyncs[0][0] == resyncs[0][1]  # ... after one resync, to the cache's keys
    finally:
        m2r2_moe.remove_offload(model)


@pytest.mark.parametrize("predictor", ["gate", "m2r2"])
def test_predictions_build_no_graph_when_grad_is_enabled(predictor):
    """Inference with grad enabled and parameters that require grad: predictions must carry no graph (a `.numpy()` of
    a tensor that requires grad raises, and the runtime would switch prefetching off), for the prompt's forward and
    for decode steps. (The prefetcher's tap hands the residuals as the model made them, so here they require grad;
    the prefetcher enters no_grad around the predictor only when grad is enabled, not at every layer: entering it
    cost µs per layer.)"""
    model, tok = m2r2_moe.load_builtin()
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    m2r2_moe.offload(model, device="cpu", cache_experts=24, predictor=predictor, link_gbps=0.5)
    try:
        model.requires_grad_(True)
        with torch.enable_grad():
            out = model(input_ids=ids)  # the prompt: the predictor's torch path
            assert out.logits.requires_grad
            model(input_ids=out.logits[:, -1:].argmax(-1))  # one token per layer call: the decode path
        stats = m2r2_moe.stats(model)
        assert stats.predictor_failures == 0 and m2r2_moe.get_offloader(model).prefetcher is not None
    finally:
        m2r2_moe.remove_offload(model)


def test_a_preempted_step_is_clipped_and_a_lasting_rise_is_followed():
    """One step the OS held up for 200 ms must not count as 2000 layers of prediction (it would switch prefetching
    off for a window); a step cost that really rises is followed within tens of steps."""
    from m2r2_moe.runtime.admission import CLIP, StepTimer

    timer = StepTimer()
    assert [timer.spent(100e-6) for _ in range(50)] == [100e-6] * 50
    assert timer.spent(0.2) == pytest.approx(CLIP * 100e-6)
    steps = [timer.spent(2e-3) for _ in range(80)]  # a 20x rise that lasts
    assert steps[0] < 1e-3 and steps[-1] == 2e-3  # clipped at first, then followed
    assert timer.spent(50e-6) == 50e-6  # a faster step is never raised


def test_decode_right_after_a_prompt_is_not_charged_to_prefetching():
    """The first decode steps after a prompt are slow whatever the arm (the cache still holds the prompt's
    experts); the first block always runs with prefetching on, so timing it would make on look slower."""
    guard = OnOff(block=4, probe=8, settle=1)
    now, arms = 0.0, []
    assert guard.step(now, decode=False) is True
    now += 1.0
    for i in range(4 * 40):
        arm = guard.step(now, decode=True)
        arms.append(arm)
        now += 0.050 if i < 4 else (0.010 if arm else 0.012)  # the prompt's wake, then on is faster
    assert not guard.blocks[True] or max(guard.blocks[True]) < 0.02  # the wake was never a sample
    assert share_on(arms[12:]) > 0.8
