"""Reading a cache for training: chunk-aligned blocks, shuffled, split across ranks, prefetched.

Over 300 lines on purpose: the loader's epoch plan, its prefetching threads and its one-copy batch gather
share state and are read together; ``read_chunk`` (a verified chunk read) is the part others use.

Each epoch (``set_epoch``):

1. the chunk order is a seeded permutation of all chunks (``seed``, ``epoch``), the same on every rank;
2. rank ``r`` of ``world_size`` takes every ``world_size``-th chunk of it (disjoint, sizes differ by at
   most one chunk);
3. the rank's chunks are grouped into windows of ``shuffle_window`` chunks; the rows of a window are
   permuted (seeded by seed, epoch, rank, window) and cut into batches, a batch may span two windows;
   within a batch the rows come in window order (sorted positions), the batch's *set* of rows is random;
4. background threads (``prefetch`` chunk loads in flight beyond the current window) load whole
   chunks while the current window is served: local uncompressed chunks are memory-mapped (pages
   populated by the loading thread; the maps are kept across epochs, up to ``max_maps``), S3/memory
   chunks are fetched whole, compressed chunks are decoded by zarr. A batch is gathered with one copy
   from those chunk arrays into fresh arrays the caller owns.
5. every chunk is checked, by the thread that loads it, against the checksums its writer recorded in
   the chunk's done marker (``verify``, on by default): a chunk whose bytes changed since it was
   written raises ``CacheError`` naming the chunk, the array and the fix (``kd cache verify --repair``,
   then rerun) instead of training on NaN or garbage. A kept map is checked once, when it is made,
   other chunks each time they are fetched: one CRC32C pass per chunk load (``kd bench cache``).

Reading whole chunks keeps every read sequential (a random 256-row batch straight from zarr decodes
every chunk it touches); the price is that rows are shuffled within a window of chunks, not globally.

Each batch is a dict of numpy arrays: ``row`` (int64 global row), ``sample_id`` (int64), ``view``
(int64), ``aug`` (float32 ``(B, P)``, P may be 0), ``features`` (dict layer -> ``(B, *shape)``), and
``logits`` or ``logits_topk_idx`` + ``logits_topk_val``. Features and logits keep the storage dtype
(fp16, fp32, or bf16 as uint16 bit patterns: ``torch.from_numpy(a).view(torch.bfloat16)``) unless
``as_float32`` is set.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from kdcore.cache import markers
from kdcore.cache.handle import CacheHandle
from kdcore.cache.layout import AUG, LOGITS, TOPK_IDX, TOPK_VAL, bf16_bits_to_float32, layer_array, output_key
from kdcore.cache.manifest import Manifest, check_manifest
from kdcore.errors import CacheError, UserError

if TYPE_CHECKING:
    from kdcore.spec.features import CacheSpec

CacheRows = dict  # one batch of cache rows: {row, sample_id, view, aug, features, logits...} numpy arrays


class CacheLoader:
    """Iterates over one rank's share of a complete cache, one epoch per iteration."""

    def __init__(
        self,
        cache: str | os.PathLike | CacheHandle,
        *,
        batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 8,
        prefetch: int = 4,
        layers: Sequence[str] | None = None,
        logits: bool = True,
        as_float32: bool = False,
        drop_last: bool = False,
        expected: Manifest | None = None,
        s3_endpoint: str | None = None,
        max_maps: int = 8192,
        verify: bool = True,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1 (got {batch_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        if shuffle_window < 1 or prefetch < 1:
            raise UserError("shuffle_window and prefetch must be >= 1")
        if isinstance(cache, CacheHandle):
            self.handle = cache
            if expected is not None:
                check_manifest(expected, cache.manifest, uri=cache.uri)
        else:
            self.handle = CacheHandle.open(cache, expected, s3_endpoint=s3_endpoint, read_only=True)
        self.handle.require_complete()
        m = self.manifest = self.handle.manifest
        if m.n_chunks < world_size:
            raise UserError(
                f"cache at {self.handle.uri} has {m.n_chunks} chunks, fewer than world_size={world_size}: "
                "some ranks would get no data; rebuild it with a smaller chunk_rows"
            )
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = int(seed), shuffle
        self.window = shuffle_window
        self.prefetch = prefetch
        self.as_float32 = as_float32
        self.drop_last = drop_last
        self.verify = verify
        self.epoch = 0
        names = list(m.layers) if layers is None else list(layers)
        unknown = [n for n in names if n not in m.layers]
        if unknown:
            raise UserError(f"layers {unknown} are not in the cache at {self.handle.uri} (it has {sorted(m.layers)})")
        self.layers = names
        paths = self._paths = chunk_paths(m, names, logits)
        self._ids = self.handle.sample_ids()
        self._cr = m.chunk_rows
        self._out_specs = []  # (path, batch key, is a layer, row shape, storage dtype, cast or None)
        for path in paths:
            io = self.handle.arrays[path]
            cast = None
            if as_float32 and path not in (TOPK_IDX, AUG):
                cast = bf16_bits_to_float32 if m.dtype == "bf16" else _to_float32
            self._out_specs.append((path, output_key(path), path.startswith("layers/"), io.row_shape, io.dtype, cast))
        # local uncompressed caches are memory-mapped; the maps are kept across epochs (bounded: each map
        # is one kernel mapping, and vm.max_map_count is ~65k by default)
        keep = self.handle.store.maps_files and all(self.handle.arrays[p].raw for p in paths)
        self._maps: OrderedDict[int, dict[str, np.ndarray]] | None = OrderedDict() if keep else None
        self._max_maps = max(2 * (shuffle_window + prefetch), max_maps // max(1, len(paths)))
        self._maps_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: "CacheSpec", *, expected: Manifest | None = None, **kwargs) -> "CacheLoader":
        """A loader for ``features.cache`` of a job spec (uri, shuffle_window, prefetch, s3_endpoint)."""
        if spec.uri is None:
            raise UserError("features.cache.uri is not set: no cache to read")
        kwargs.setdefault("shuffle_window", spec.shuffle_window)
        kwargs.setdefault("prefetch", spec.prefetch)
        return cls(spec.uri, expected=expected, s3_endpoint=spec.s3_endpoint, **kwargs)

    def close(self) -> None:
        """Drop the kept chunk maps (they are also dropped with the loader)."""
        if self._maps is not None:
            with self._maps_lock:
                self._maps.clear()

    # ---- the epoch plan ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: each epoch has its own order, the same for the same seed and epoch."""
        if int(epoch) < 0:
            raise UserError(f"epoch must be >= 0 (got {epoch})")
        self.epoch = int(epoch)

    def _chunk_rows(self, i: int) -> int:
        start, stop = self.handle.chunk_bounds(i)
        return stop - start

    def chunks_for(self, epoch: int, rank: int) -> list[int]:
        """The chunks rank ``rank`` reads in ``epoch``, in reading order."""
        n = self.manifest.n_chunks
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return [int(i) for i in order[rank::self.world_size]]

    def rows_for(self, epoch: int, rank: int) -> int:
        return sum(self._chunk_rows(i) for i in self.chunks_for(epoch, rank))

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (with ``drop_last``: the same on every rank)."""
        if self.drop_last:
            return min(self.rows_for(self.epoch, r) for r in range(self.world_size)) // self.batch_size
        return math.ceil(self.rows_for(self.epoch, self.rank) / self.batch_size)

    # ---- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[CacheRows]:
        epoch, rank, cr, bs = self.epoch, self.rank, self._cr, self.batch_size
        chunks = self.chunks_for(epoch, rank)
        windows = [chunks[k:k + self.window] for k in range(0, len(chunks), self.window)]
        limit = len(self)
        if limit == 0:
            return
        pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="kd-cache-read")
        futures: deque[Future] = deque()  # chunk loads, in reading order
        submitted = 0

        def ensure(n: int) -> None:  # keep the loads of the first n chunks submitted
            nonlocal submitted
            while submitted < min(n, len(chunks)):
                futures.append(pool.submit(self._load, chunks[submitted]))
                submitted += 1

        try:
            served = 0
            carry: CacheRows | None = None
            for w, blocks in enumerate(windows):
                ensure((w + 1) * self.window + self.prefetch)
                srcs = [futures.popleft().result() for _ in blocks]
                pos = np.concatenate([np.arange(s * cr, s * cr + self._chunk_rows(c)) for s, c in enumerate(blocks)])
                if self.shuffle:
                    pos = np.random.default_rng([self.seed, epoch, rank, w]).permutation(pos)
                base = np.asarray(blocks, dtype=np.int64) * cr
                p = 0
                if carry is not None:  # complete the batch begun in the previous window
                    need = bs - len(carry["row"])
                    (part,) = self._gather(srcs, base, pos[None, :need])
                    p = len(part["row"])
                    carry = _concat(carry, part)
                    if len(carry["row"]) == bs:
                        if served >= limit:
                            return
                        yield carry
                        served += 1
                        carry = None
                if carry is None:
                    k = min((len(pos) - p) // bs, limit - served)
                    if k > 0:
                        yield from self._gather(srcs, base, pos[p:p + k * bs].reshape(k, bs))
                        served += k
                        p += k * bs
                    if served >= limit:
                        return
                    if p < len(pos):  # the rest starts the next batch
                        (carry,) = self._gather(srcs, base, pos[None, p:])
                del srcs
            if carry is not None and served < limit and not self.drop_last:
                yield carry
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, chunk: int) -> dict[str, np.ndarray]:
        """The chunk's rows of every array read, as (read-only) arrays. Memory-mapped local chunks are kept
        (up to ``max_maps``) and reused by later epochs, like one np.memmap of a file would be."""
        if self._maps is None:
            return self._read(chunk)
        with self._maps_lock:
            hit = self._maps.get(chunk)
            if hit is not None:
                self._maps.move_to_end(chunk)
                return hit
        views = self._read(chunk)
        with self._maps_lock:
            self._maps[chunk] = views
            while len(self._maps) > self._max_maps:
                self._maps.popitem(last=False)
        return views

    def _read(self, chunk: int) -> dict[str, np.ndarray]:
        return read_chunk(self.handle, chunk, self._paths, verify=self.verify)

    def _gather(self, srcs: list[dict[str, np.ndarray]], base: np.ndarray, pos: np.ndarray) -> Iterator[CacheRows]:
        """One batch per row of ``pos`` (k, n): the rows at those window positions (slot * chunk_rows +
        offset), in ascending position order. Bookkeeping is vectorised over the k batches; the batches
        themselves are made one at a time (so their memory is recycled by the allocator, not faulted in)."""
        cr, n_src = self._cr, len(srcs)
        k, n = pos.shape
        idx = np.sort(pos, axis=1)
        slot = idx // cr
        local = idx - slot * cr
        rows = base[slot] + local
        views = self.manifest.views
        sample_ids = self._ids[rows // views]
        view = rows % views
        # start of each (batch, slot) run in the flattened, sorted (batch, slot) keys
        keys = (slot + np.arange(k)[:, None] * n_src).ravel()
        starts = np.searchsorted(keys, np.arange(k * n_src + 1)).tolist()
        no_aug = np.zeros((n, 0), dtype=np.float32)
        for b in range(k):
            lo = b * n
            bounds = starts[b * n_src:(b + 1) * n_src + 1]  # batch b's rows of slot s: bounds[s]:bounds[s+1]
            parts = [(srcs[s], bounds[s] - lo, bounds[s + 1] - lo) for s in range(n_src) if bounds[s] < bounds[s + 1]]
            loc = local[b]
            batch: CacheRows = {"row": rows[b], "sample_id": sample_ids[b], "view": view[b], AUG: no_aug}
            feats = {}
            for path, key, is_layer, row_shape, dtype, cast in self._out_specs:
                value = np.empty((n, *row_shape), dtype=dtype)
                for src, a, e in parts:  # clip: indices are valid anyway, and `out` is not buffered
                    src[path].take(loc[a:e], axis=0, out=value[a:e], mode="clip")
                if cast is not None:
                    value = cast(value)
                if is_layer:
                    feats[key] = value
                else:
                    batch[key] = value
            batch["features"] = feats
            yield batch


def chunk_paths(manifest: Manifest, layers: Sequence[str] | None = None, logits: bool = True) -> list[str]:
    """The arrays a reader of ``layers`` (default all) needs: features, logits (or top-k), augmentation."""
    paths = [layer_array(n) for n in (manifest.layers if layers is None else layers)]
    if logits and manifest.num_classes is not None:
        paths += [LOGITS] if manifest.logits_topk is None else [TOPK_IDX, TOPK_VAL]
    if manifest.aug_params > 0:
        paths.append(AUG)
    return paths


def read_chunk(handle: CacheHandle, chunk: int, paths: Sequence[str] | None = None,
               verify: bool = True) -> dict[str, np.ndarray]:
    """Chunk ``chunk`` of each array in ``paths`` (default :func:`chunk_paths`), read-only, in its storage dtype;
    with ``verify``, checked against the checksums its writer recorded in the chunk's done marker: a chunk whose
    bytes changed since it was written raises ``CacheError`` naming the chunk, the array and the fix."""
    paths = chunk_paths(handle.manifest) if paths is None else paths
    views = {path: handle.arrays[path].view(chunk) for path in paths}
    if not verify:
        return views
    uri = handle.uri
    fix = f"run `kd cache verify --repair {uri}`, then rerun (the build rewrites only the damaged chunks)"
    marker = markers.read_marker(handle.store, chunk)
    if marker is None:
        raise CacheError(f"chunk {chunk} of the cache at {uri} has no readable done marker, so its checksums "
                         f"cannot be checked; {fix}", chunk=chunk, array=None, uri=uri)
    for path, data in views.items():
        problem = markers.mismatch(marker, path, data)
        if problem:
            raise CacheError(f"chunk {chunk} (rows {marker.row_start}:{marker.row_stop}) of array {path!r} in the "
                             f"cache at {uri} is corrupted ({problem}); {fix}", chunk=chunk, array=path, uri=uri)
    return views


def _to_float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def _concat(a: CacheRows, b: CacheRows) -> CacheRows:
    out: CacheRows = {}
    for key, value in a.items():
        if key == "features":
            out[key] = {k: np.concatenate([v, b[key][k]]) for k, v in value.items()}
        else:
            out[key] = np.concatenate([value, b[key]])
    return out
