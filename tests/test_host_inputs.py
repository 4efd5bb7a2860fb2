"""Step inputs packed on the host (serving/models/host_inputs.py): every part comes back as added, from
one tensor whose memory outlives the packer."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from array import array
from pathlib import Path

import torch

from serving.models.host_inputs import HostInts, cache_slot, cache_slots


def test_parts_come_back_as_added_padded_rows_included():
    ints = HostInts()
    ids = ints.add([5, 7, 2**40])  # block-table-sized and beyond int32 alike
    rows = ints.add_rows([[3], [4, 5, 6], []], 3)
    empty = ints.add([])
    lens = ints.add([1, 2])
    on = ints.to(torch.device("cpu"))
    del ints
    gc.collect()
    _ = [bytearray(1 << 16) for _ in range(64)]  # reuse freed memory, were the tensor's not kept alive
    assert on(ids).tolist() == [5, 7, 2**40]
    assert on(rows).tolist() == [[3, 0, 0], [4, 5, 6], [0, 0, 0]]
    assert on(empty).tolist() == []
    assert on(lens).tolist() == [1, 2] and on(lens).dtype == torch.long


def test_every_part_starts_16_byte_aligned_whatever_came_before():
    """Triton keys its compiled kernels on each pointer's 16-byte alignment: parts at the mercy of the
    lengths before them would compile a second variant of every kernel mid-traffic."""
    ints = HostInts()
    parts = [ints.add([1] * n) if n % 2 else ints.add_rows([[2] * n], n + 1) for n in (1, 3, 2, 5, 7, 1)]
    on = ints.to(torch.device("cpu"))
    assert all(on(part).data_ptr() % 16 == 0 for part in parts)
    assert on(parts[0]).tolist() == [1] and on(parts[1]).tolist() == [1, 1, 1] and on(parts[2]).tolist() == [[2, 2, 0]]


def test_block_tables_go_in_as_int64_arrays_cut_or_padded_to_the_width():
    # Sequences hold their tables as array('q') (copied as raw memory); a table may hold blocks beyond
    # the step's width (reserved ahead), and the CUDA-graph path pads with lists.
    ints = HostInts()
    first = ints.add(array("q", [2**40, 3]))
    rows = ints.add_rows([array("q", [1, 2, 3, 4]), array("q", [5]), [6, 6, 6], array("q")], 3)
    on = ints.to(torch.device("cpu"))
    assert on(first).tolist() == [2**40, 3]
    assert on(rows).tolist() == [[1, 2, 3], [5, 0, 0], [6, 6, 6], [0, 0, 0]]


def test_nothing_added_is_an_empty_tensor():
    assert HostInts().to(torch.device("cpu"))((0, 0)).numel() == 0


def test_a_decode_tokens_slot_is_the_one_of_its_position_in_a_range():
    table, bs = [9, 4, 7], 16
    for position in (0, 15, 16, 31, 47):
        assert cache_slot(table, position, bs) == cache_slots(table, position, position + 1, bs)[0]
    assert cache_slot(table, 17, bs) == 4 * 16 + 1


def test_the_host_overhead_bench_runs(tmp_path):
    out = tmp_path / "host.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.host_overhead", "--batches", "3", "--steps", "4", "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["path"].split()[0]) for r in rows] == [(3, "eager"), (3, "static")]
    assert all(r["step_ms"] > r["model_ms"] > 0 and r["host_ms"] > 0 for r in rows)
