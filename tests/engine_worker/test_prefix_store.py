"""The prefix store (engine_worker/prefix_store.py): blocks saved from one slot and loaded into another arrive
intact, whether the store ids are consecutive (one slice) or scattered (run by run); a block's memory is
committed when it is written and goes back to the OS, alone, when it is released."""

from __future__ import annotations

import pytest
import torch

from engine_worker.prefix_store import PrefixStore
from tests.engine_worker.resident import store_resident_bytes

LAYERS, HEADS, DIM, BLOCK, SLOT_LEN = 2, 3, 8, 4, 32


@pytest.mark.parametrize(
    "store_ids",
    [pytest.param([0, 1, 2, 3], id="consecutive"), pytest.param([5, 2, 3, 0], id="scattered")],
)
def test_saved_blocks_load_back_into_another_slot(store_ids: list[int]) -> None:
    store = PrefixStore(2 * LAYERS, 8, BLOCK, HEADS, DIM, torch.float32, torch.device("cpu"))
    views = [torch.randn(3, HEADS, SLOT_LEN, DIM) for _ in range(2 * LAYERS)]
    store.save(views, 0, list(enumerate(store_ids)))
    store.load(views, [(2, store_ids[:3])])  # the first three blocks into slot 2
    for view in views:
        assert torch.equal(view[2, :, : 3 * BLOCK], view[0, :, : 3 * BLOCK])
        assert not torch.equal(view[2, :, 3 * BLOCK :], view[0, :, 3 * BLOCK :])  # nothing past them


def test_a_later_block_of_a_slot_is_saved_from_its_own_position() -> None:
    store = PrefixStore(2, 4, BLOCK, HEADS, DIM, torch.float32, torch.device("cpu"))
    views = [torch.randn(2, HEADS, SLOT_LEN, DIM) for _ in range(2)]
    store.save(views, 1, [(2, 3)])  # slot 1's third block into store block 3
    for view, blocks in zip(views, store.blocks, strict=True):
        assert torch.equal(blocks[3], view[1, :, 2 * BLOCK : 3 * BLOCK])


def test_released_blocks_go_back_to_the_os_and_the_others_stay() -> None:
    store = PrefixStore(2 * LAYERS, 8, BLOCK, HEADS, DIM, torch.float32, torch.device("cpu"))
    if store_resident_bytes(store) is None:
        pytest.skip("mincore is not available here")
    per_block = store.bytes_per_block
    assert per_block >= 2 * LAYERS * HEADS * BLOCK * DIM * 4 and store_resident_bytes(store) == 0  # nothing yet
    views = [torch.randn(1, HEADS, SLOT_LEN, DIM) for _ in range(2 * LAYERS)]
    store.save(views, 0, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 5)])
    assert store_resident_bytes(store) == 5 * per_block  # committed block by block, as written
    store.release([1, 2, 5])
    assert store_resident_bytes(store) == 2 * per_block  # before anything reads them (a read maps the zero page)
    for view, blocks in zip(views, store.blocks, strict=True):
        assert torch.equal(blocks[0], view[0, :, :BLOCK]) and torch.equal(blocks[3], view[0, :, 3 * BLOCK : 4 * BLOCK])
        assert not blocks[1].any() and not blocks[5].any()  # released blocks read as zeros
