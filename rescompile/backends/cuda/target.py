"""Launch shapes: how big tiles and grids are on a real GPU and on the simulator.

The simulator runs every thread as a Python thread, so it wants few threads doing more work
each; a GPU wants thousands of threads. Only sizes differ; the generated code is the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    block: int          # threads per block of elementwise kernels
    max_blocks: int     # grid-stride loops cap their grid here
    tile_m: int         # GEMM tile rows (output pixels), per block
    tile_k: int         # GEMM reduction slab staged in shared memory
    reg_m: int          # output rows per thread
    max_tile_n: int     # GEMM tile columns (output channels), per block
    threads_n: int      # threads across a tile's columns
    min_gemm_blocks: int  # fewer blocks than this: split K (deterministically) to fill the GPU
    min_split_k: int    # never split K into pieces shorter than this
    reduce_rows: int    # rows each thread sums in a two-level reduction
    reduce_threads: int  # aim for about this many threads in the first level


GPU = Target(block=256, max_blocks=4096, tile_m=64, tile_k=16, reg_m=4, max_tile_n=64, threads_n=16,
             min_gemm_blocks=264, min_split_k=256, reduce_rows=32, reduce_threads=32768)
SIMULATOR = Target(block=32, max_blocks=1, tile_m=16, tile_k=8, reg_m=4, max_tile_n=16, threads_n=4,
                   min_gemm_blocks=4, min_split_k=16, reduce_rows=32, reduce_threads=32)
