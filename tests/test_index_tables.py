"""Decode's slot-index tables are made once per content and never handed out changed; the strided slot range a
wave's view covers."""

import torch

import random

from m2r2_moe.runtime.experts import IndexTables, slot_range


def test_a_table_is_made_once_per_content_and_remade_when_a_kernel_changed_it():
    tables = IndexTables(torch.device("cpu"))
    a = tables.get((3, 1))
    assert a.dtype == torch.long and a.tolist() == [[3, 1]]
    assert tables.get((3, 1)) is a  # looked up, not made again
    assert tables.get((1, 3)).tolist() == [[1, 3]]  # the order is part of the content
    a.add_(1)  # a kernel that wrote into its index argument
    b = tables.get((3, 1))
    assert b is not a and b.tolist() == [[3, 1]]


def test_the_tables_kept_are_bounded(monkeypatch):
    monkeypatch.setattr(IndexTables, "LIMIT", 3)
    tables = IndexTables(torch.device("cpu"))
    for i in range(10):
        assert tables.get((i,)).tolist() == [[i]]
        assert len(tables._tables) <= 3


def test_the_slot_range_covers_the_slots_with_the_widest_even_step():
    """(lo, hi, step): the slots themselves when evenly spaced (one or two always are), else every slot from lo to
    hi; the same whatever their order (two slots take a path without a sort: checked against the rule here)."""
    rng = random.Random(0)
    for _ in range(500):
        slots = rng.sample(range(64), rng.randint(1, 5))
        ordered = sorted(slots)
        gaps = {b - a for a, b in zip(ordered, ordered[1:])}
        step = gaps.pop() if len(gaps) == 1 else 1
        expected = (ordered[0], ordered[-1], step if len(ordered) > 1 else 1)
        assert slot_range(slots) == expected, slots
        lo, hi, step = expected
        assert set(slots) <= set(range(lo, hi + 1, step))
