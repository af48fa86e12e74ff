"""Ray Train student training: the per-worker recipe and the driver that launches it."""
