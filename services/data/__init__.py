"""Ray Data as the input pipeline of Ray jobs: cache chunks joined with their input rows, decoded and
augmented in ``map_batches`` (on any CPU node), consumed by Ray Train workers through their dataset shard."""
