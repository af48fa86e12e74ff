"""The training loader: coverage per epoch across ranks, seeded order, content, views and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from cache_fake_teacher import AUG_PARAMS, SAMPLE_IDS, VIEWS, compute, manifest

from kdcore.cache import CacheLoader, CacheWriter, build
from kdcore.errors import CacheError, UserError
from kdcore.spec.features import CacheSpec

N_ROWS = 600


@pytest.fixture(scope="module")
def cache_uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("loader") / "c")
    build(CacheWriter.create(uri, manifest(), SAMPLE_IDS), compute)
    return uri


def epoch_rows(loader: CacheLoader) -> np.ndarray:
    return np.concatenate([b["row"] for b in loader])


@pytest.mark.parametrize("batch,window", [(32, 2), (50, 3), (256, 1), (1000, 8)])
def test_every_row_exactly_once_per_epoch_across_two_ranks(cache_uri, batch, window):
    loaders = [CacheLoader(cache_uri, batch_size=batch, rank=r, world_size=2, seed=3, shuffle_window=window,
                           prefetch=2) for r in (0, 1)]
    for epoch in range(3):
        parts = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(len(b["row"]) == batch for b in batches[:-1])
            parts.append(np.concatenate([b["row"] for b in batches]))
        both = np.concatenate(parts)
        assert len(both) == N_ROWS
        assert np.array_equal(np.sort(both), np.arange(N_ROWS))
        # ranks read disjoint whole chunks
        chunks = [set(p // 64) for p in parts]
        assert not chunks[0] & chunks[1]


def test_order_differs_per_epoch_and_repeats_for_same_seed_and_epoch(cache_uri):
    a = CacheLoader(cache_uri, batch_size=64, seed=11, shuffle_window=4)
    b = CacheLoader(cache_uri, batch_size=64, seed=11, shuffle_window=4)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        ra, rb = epoch_rows(a), epoch_rows(b)
        assert np.array_equal(ra, rb)
        orders.append(ra)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    a.set_epoch(0)
    assert np.array_equal(epoch_rows(a), orders[0])  # going back to an epoch gives its order again
    c = CacheLoader(cache_uri, batch_size=64, seed=12, shuffle_window=4)
    assert not np.array_equal(epoch_rows(c), orders[0])


def test_rows_are_shuffled_within_windows_of_chunks(cache_uri):
    loader = CacheLoader(cache_uri, batch_size=600, shuffle_window=3)
    rows = epoch_rows(loader)
    chunk_seq = rows // 64
    # window 0 covers the first 3 chunks of the epoch's chunk order: its rows come first
    first = set(loader.chunks_for(0, 0)[:3])
    n_first = sum(min(64, N_ROWS - 64 * c) for c in first)
    assert set(chunk_seq[:n_first]) == first
    unshuffled = CacheLoader(cache_uri, batch_size=600, shuffle=False)
    assert np.array_equal(epoch_rows(unshuffled), np.arange(N_ROWS))
    assert not np.array_equal(rows, np.sort(rows))


def test_batches_carry_the_right_content(cache_uri):
    full = compute(0, N_ROWS)
    loader = CacheLoader(cache_uri, batch_size=77, rank=1, world_size=2, seed=5, shuffle_window=2)
    n = 0
    for b in loader:
        r = b["row"]
        n += len(r)
        assert np.array_equal(b["sample_id"], SAMPLE_IDS[r // VIEWS])
        assert np.array_equal(b["view"], r % VIEWS)
        assert b["aug"].shape == (len(r), AUG_PARAMS) and b["aug"].dtype == np.float32
        assert np.array_equal(b["aug"], full["aug"][r])
        assert np.array_equal(b["aug"][:, 1], b["view"])  # the fake teacher's 2nd param is the view
        assert np.array_equal(b["features"]["embed"], full["embed"][r].astype(np.float16))
        assert np.array_equal(b["features"]["block.3"], full["block.3"][r].astype(np.float16))
        assert b["features"]["block.3"].shape == (len(r), 4, 3)
        assert np.array_equal(b["logits"], full["logits"][r].astype(np.float16))
        b["features"]["embed"][:] = 0  # batches are the caller's own arrays
    assert n == len(np.concatenate([b["row"] for b in loader]))
    again = next(iter(loader))
    assert again["features"]["embed"].any()


def test_drop_last_gives_every_rank_the_same_number_of_full_batches(cache_uri):
    lens = []
    for rank in (0, 1, 2):
        loader = CacheLoader(cache_uri, batch_size=40, rank=rank, world_size=3, drop_last=True)
        batches = list(loader)
        assert all(len(b["row"]) == 40 for b in batches)
        lens.append(len(batches))
    assert len(set(lens)) == 1 and lens[0] == min(  # floor of the smallest rank's rows
        CacheLoader(cache_uri, batch_size=40, rank=r, world_size=3).rows_for(0, r) for r in range(3)) // 40


def test_layer_subset_and_no_logits(cache_uri):
    loader = CacheLoader(cache_uri, batch_size=100, layers=["block.3"], logits=False)
    b = next(iter(loader))
    assert set(b["features"]) == {"block.3"} and "logits" not in b
    with pytest.raises(UserError, match="not in the cache"):
        CacheLoader(cache_uri, layers=["nope"])


def test_from_spec_uses_spec_options(cache_uri):
    spec = CacheSpec(uri=cache_uri, shuffle_window=2, prefetch=1)
    loader = CacheLoader.from_spec(spec, expected=manifest(), batch_size=64)
    assert loader.window == 2 and loader.prefetch == 1
    assert len(epoch_rows(loader)) == N_ROWS


def test_incomplete_cache_is_refused_with_resume_hint(tmp_path):
    uri = str(tmp_path / "c")
    w = CacheWriter.create(uri, manifest(), SAMPLE_IDS)
    w.write_chunk(0, compute(0, 64))
    with pytest.raises(CacheError, match=r"incomplete \(1 of 10 chunks.*kd cache build JOB.yaml"):
        CacheLoader(uri)


def test_too_many_ranks_for_the_chunks(cache_uri):
    with pytest.raises(UserError, match="fewer than world_size"):
        CacheLoader(cache_uri, rank=0, world_size=11)


@pytest.mark.parametrize("compression", ["zstd", "blosc"])
def test_compressed_caches_read_the_same(tmp_path, cache_uri, compression):
    uri = str(tmp_path / compression)
    build(CacheWriter.create(uri, manifest(compression=compression), SAMPLE_IDS), compute)
    a = CacheLoader(uri, batch_size=128, seed=1)
    b = CacheLoader(cache_uri, batch_size=128, seed=1)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["row"], y["row"])
        assert np.array_equal(x["features"]["embed"], y["features"]["embed"])
        assert np.array_equal(x["logits"], y["logits"])
