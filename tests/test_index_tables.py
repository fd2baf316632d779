"""Decode's slot-index tables are made once per content and never handed out changed."""

import torch

from m2r2_moe.runtime.experts import IndexTables


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
