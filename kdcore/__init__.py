"""kdcore: the knowledge-distillation library behind kd (specs, heads, losses, taps, cache, loop).

Runs in one process with torch, numpy, zarr, pyarrow and pydantic; it never imports Ray.
"""

__version__ = "0.1.0"
