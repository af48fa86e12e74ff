"""The training worker's feature source in cache mode: its shard of the job's Ray Data pipeline."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from kdcore.cache.layout import LOGITS, TOPK_IDX, TOPK_VAL
from kdcore.data.rows import RowMapper
from kdcore.data.splits import DataSplit
from kdcore.feed import Batch
from kdcore.spec.job import JobSpec
from services.data.datasource import FEATURE_PREFIX


def teacher_logits(batch: dict[str, Any], num_classes: int) -> torch.Tensor:
    """Logits of a cache batch: stored whole, or as top-k (the rest get -1e4: no mass at KD's temperatures)."""
    if LOGITS in batch:
        return torch.from_numpy(np.asarray(batch[LOGITS], dtype=np.float32))
    idx = torch.from_numpy(np.asarray(batch[TOPK_IDX], dtype=np.int64))
    val = torch.from_numpy(np.asarray(batch[TOPK_VAL], dtype=np.float32))
    return torch.full((len(idx), num_classes), -1e4).scatter_(1, idx, val)


class ShardFeatures:
    """Batches of one worker's ``get_dataset_shard("train")``: each epoch is one pass over the shard, batches cut
    from its blocks in the order they come (the pipeline's blocks are already mixed by windows of
    ``shuffle_window`` chunks: ``services.data.datasource``)."""

    def __init__(self, job: JobSpec, split: DataSplit, shard, num_classes: int) -> None:
        self.job, self.split, self.shard, self.num_classes = job, split, shard, num_classes
        self.mapper = RowMapper(split, job.data)  # the views come as pixels for image data: to_model here

    def epoch(self, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        bs = self.job.data.batch_size
        for b in self.shard.iter_batches(batch_size=bs, batch_format="numpy", drop_last=world > 1,
                                         prefetch_batches=2):
            s = np.asarray(b["sample"], dtype=np.int64)
            teacher = {k[len(FEATURE_PREFIX):]: torch.from_numpy(np.asarray(v, dtype=np.float32))
                       for k, v in b.items() if k.startswith(FEATURE_PREFIX)}
            if LOGITS in b or TOPK_IDX in b:  # one teacher (several: their logits are f.<teacher>/logits columns)
                teacher[LOGITS] = teacher_logits(b, self.num_classes)
            yield Batch(x=torch.from_numpy(np.ascontiguousarray(self.mapper.to_model(b["x"]), dtype=np.float32)),
                        y=torch.from_numpy(self.split.y_train[s]), labeled=torch.from_numpy(self.split.labeled[s]),
                        idx=torch.from_numpy(s), teacher=teacher)
