"""Every tuning constant of qgemm, with a line on how it was chosen.

Kernels and wrappers import their thresholds from here; nothing else in the package defines a
parallel-from size, a prefetch distance or a chunk size.  Changing a value here changes speed
only, never results (every kernel is bit-identical across its serial and parallel forms).
Values were measured on 2-core AMD EPYC VMs (Zen 3 AVX2 and Zen 4 AVX-512 VNNI) with
``python -m qgemm bench``; re-measure there before changing one.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------- GEMM

GEMM_PARALLEL_MIN_MACS = 1 << 22
"""AVX-512 VNNI: int8 GEMM calls with fewer multiply-adds (M*N*K) run the serial kernel.
Below 2^22 a parallel region costs more than it saves (worker wake-up): 6x256x1024 ran 12 us
serial vs 24 us parallel and 128^3 17 vs 21 us; from 2^22 (1x4096x1024: 67 -> 57 us) the
second core pays.  Each ISA path carries its own break-even (``IsaPath.parallel_min_macs``)."""

GEMM_PARALLEL_MIN_WEIGHT_BYTES = 1 << 21
"""AVX-512 VNNI: int8 GEMM calls over at least this many bytes of weights run in parallel even
below ``GEMM_PARALLEL_MIN_MACS``: at M = 1 a call streams its weights from L3 and a second
core streams more (measured on Zen 5, 2 threads, same run, dynamic / static:
1x800x3200 28 -> 22-24 / 30 -> 21 us, 1x2048x1024 25.9 -> 20.4 / 24.4 -> 18.8 us;
1x1024x1024 level).  The 256-bit paths set it to 2^22, where the MAC threshold
(2^21) already decides: int8 weights of 2^22 bytes or float16 ones (2 bytes each) mean at
least 2^21 MACs."""

GEMM_PARALLEL_MIN_MACS_AVX2 = 1 << 21
"""AVX2 and the portable path: the serial-below size of the int8 GEMM.  The 256-bit kernels do
fewer MACs per second, so the second core pays earlier: on Zen 3 (2 threads, same-run medians,
serial at 2^22 vs parallel at 2^21) 1x800x3200 static 130 -> 76 us, dynamic 87 -> 58 us;
128^3 55 -> 39 us; 6x256x2048 85 -> 63 us; 16x256x512 level.  Below 2^21 (6x256x1024,
16x128x512 at 2^20) parallel was level or slower.  AVX-VNNI (256-bit ``vpdpbusd``) uses it too:
no such CPU was at hand to measure."""

GEMM_PARALLEL_MIN_WEIGHT_BYTES_AVX2 = 2 * GEMM_PARALLEL_MIN_MACS_AVX2
"""AVX2, AVX-VNNI and the portable path: never binding (see
``GEMM_PARALLEL_MIN_WEIGHT_BYTES``): the MAC threshold decides alone."""

GEMM_PROBE_MIN = 0.25
"""Adaptive threads (``QGEMM_ADAPTIVE_THREADS=1``): shortest re-probe interval, in seconds."""

GEMM_PROBE_MAX = 8.0
"""Adaptive threads: longest re-probe interval after repeated agreement (exponential backoff)."""

# ------------------------------------------------------------------------------ quantize

QUANTIZE_BLOCK = 1 << 16
"""Elements per parallel task of the per-tensor (de)quantize kernels (256 KiB of float32)."""

QUANTIZE_PARALLEL_MIN_ELEMS = 1 << 17
"""(De)quantization of fewer elements runs serially: a parallel region costs ~10 us on a
2-core VM, more than the whole pass below this size."""

ROWWISE_ROW_CHUNK = 1 << 15
"""Rows quantized per pass by ``quantize_rowwise`` (bounds the float temporaries)."""

# ----------------------------------------------------------------------------- embedding

EMBEDDING_PARALLEL_MIN_WORK = 1 << 16
"""Embedding-bag calls touching fewer table elements (indices x dim) run on one thread."""

EMBEDDING_PREFETCH = 16
"""Shortest row prefetch distance, in indices (FBGEMM's default), and the distance of the
run-time-dim kernels (0: no prefetching)."""

EMBEDDING_PREFETCH_BYTES = 8192
"""Bytes of rows ahead that the specialised-dim kernels prefetch (distance in indices =
this // bytes read per row, within ``EMBEDDING_PREFETCH`` .. ``EMBEDDING_PREFETCH_MAX``).
A fixed 16 rows keeps too few misses in flight for short rows: measured on Zen 5 (2 threads,
same process, alternating, rows from DRAM), 1M x 64 8-bit (72-byte rows) 16 rows 101-126 us,
32 rows 77, 64 rows 53, 4 KiB 57-64, 8 KiB 43-54, 16 KiB 56; 4M x 64 8-bit 163-199 ->
81-84 us; 1M x 64 4-bit 99-120 -> 49-52 us; float32 dim 64 (256-byte rows: 32 rows) level
(157-199 vs 163-179 us); cache-resident rows level within noise.  Not measured on AVX2 CPUs
(Zen 3's fewer miss buffers may prefer less)."""

EMBEDDING_PREFETCH_MAX = 128
"""Longest row prefetch distance, in indices."""

EMBEDDING_PREFETCH_TAIL = True
"""Also prefetch the line holding a row's last byte (a row that does not start on a line
boundary spans one line more than its size suggests)."""

EMBEDDING_PREFETCH_ALL_LINES = True
"""Prefetch one line per 64 bytes of the upcoming row (False: its first line only)."""

EMBEDDING_ALIGNED_LOADS = True
"""float32 tables whose rows all start 16 bytes past a vector boundary (numpy's large arrays)
are read with aligned vector loads from 16 bytes before each row, the extra lanes dropped at
the store: no load straddles two cache lines (measured 5-17 % faster than the split loads
on the 100k x 32 and 1M x 64 bench configs, one thread, same run)."""

# ------------------------------------------------------------------------------- DLRM

INTERACTION_PARALLEL_MIN_MACS = 1 << 17
"""Below this many multiply-adds per call the DLRM interaction runs serially (waking the
worker costs more than the work)."""

# --------------------------------------------------------------------------- averaging

AVERAGING_CHUNK = 1 << 16
"""Elements per parallel work item of the averaging kernels (256 KiB of float32)."""

AVERAGING_PARALLEL_MIN = 1 << 17
"""Buffers with fewer elements use the serial averaging kernels."""

AVERAGING_MULTI_CHUNK = 1 << 16
"""Elements per block of the all-models kernel: its float64 block buffer (512 KiB) stays in L2
and each model is read in 256 KiB runs, long enough for the hardware prefetchers (measured
~15% faster than 4096-element blocks on 50M parameters)."""

AVERAGING_MULTI_MIN = 1 << 15
"""Leaves with fewer elements take the per-model kernels (no per-count compilation)."""

AVERAGING_MULTI_MAX = 16
"""Most models the all-models kernel takes (one compiled kernel per count, cached on disk)."""

# --------------------------------------------------------------------------- distributed

DIST_SHARD_MEMORY_FRACTION = 0.25
"""``qgemm.distributed.ShardedDLRM`` splits a table by rows when it is larger than this
fraction of the smallest worker memory limit: a worker needs room for its shards plus Dask's
spill headroom (it pauses at 80 %, spills at 60-70 %) and the batch buffers; a quarter leaves
both (not a speed constant: it decides placement, never results beyond the row-split bound)."""

# ------------------------------------------------------------------ half-precision GEMM

# The half-weight GEMM (``linear_half``) goes parallel from the same per-path break-even as
# the int8 GEMM (``IsaPath.parallel_min_macs``).  Measured on Zen 3 (2 threads, same run,
# serial at 2^22 vs parallel from 2^21): 1x800x3200 105-120 -> 63-99 us, 128^3 64-66 -> 52 us,
# 16x256x512 59-63 -> 46-53 us, 6x256x2048 94-95 -> 73-77 us; at 2^20 and below parallel was
# level or slower in one of two runs.  Not re-measured on AVX-512.

HALF_MR_AVX2 = 6
"""Rows of the AVX2 half-weight register tile: 6 rows x 2 ymm accumulators = 12 of the 16 ymm,
plus 2 widened weight vectors and one broadcast (FBGEMM's FP16 AVX2 kernel uses 6 x 16 too)."""

HALF_MR_AVX512 = 12
"""Rows of the AVX-512 half-weight tile: 12 rows x 2 panels = 24 zmm accumulators of 16
columns, two widened weight vectors, broadcasts folded into the FMAs -- leaves zmm for the
scheduler (FBGEMM goes to 14 rows).  (One panel, 12 accumulators, ran 0.78-0.9x as fast.)"""

HALF_PORTABLE_KC = 256
"""K rows of a panel widened at once on the portable path (16 KiB of float32 scratch: L1)."""

HALF_PREFETCH_AVX2 = 2048
"""Bytes ahead (64 rows of k) at which the AVX2 half-weight tile prefetches its panel when the
call has one row tile (M <= MR: each weight is used once, streamed from L3/DRAM at 32 bytes
per 12 FMAs).  Measured on Zen 3, one thread, same run (thread CPU time): 6x4096x2048 -20 %,
3x4096x1024 -14 %, 5x4096x1024 -6 %, L2-resident shapes unchanged (512/1024/4096 bytes:
less or the same); prefetching at every M (or in the 1- and 2-row wide tiles) cost 6-20 %.
Not used on the AVX-512 paths (not measured there)."""

HALF_TASKS_PER_THREAD = 4
"""Tasks (64-column panel groups x row chunks) per thread that the parallel half-weight GEMM
aims for: its workers take tasks dynamically, so a few per thread let a thread slowed by a busy
core take fewer (the int8 GEMM's reasoning); row chunks stay >= MR rows, so at large N there is
one chunk per group and the panels' weights are read once.  Chosen, not tuned: 2-thread timings
were dominated by other processes' load when this was written."""

# ----------------------------------------------------------------------- laplace (issue 14)

LAPLACE_BLOCK = 64
"""Examples per parallel work item of the MLP Jacobian kernel (its scratch is allocated once
per block; 64 examples of a 1000-weight subnetwork are ~0.5 MiB of output, in L2)."""

LAPLACE_BATCH_ELEMS = 1 << 21
"""Streaming batch of ``SubnetLaplace.fit``/``predictive``: examples per batch are chosen so
the batch's Jacobian/GGN factor (examples x outputs x weights, float64) holds about this many
elements (16 MiB): large enough that the P x P BLAS update runs at full speed, small enough
to stay O(batch x n_params)."""

# ------------------------------------------------------------- GEMM (dynamic prologue)

GEMM_QUANTIZE_PARALLEL_MIN_ELEMS = 1 << 16
"""The dynamic GEMM (``linear``) finds the activations' range and quantizes them with a
``prange`` over rows from this many elements (M*K) on, serially below (kept from the kernel's
earlier local constant, 256 KiB of float32: below it the parallel region costs more than the
pass; not re-measured)."""

# ------------------------------------------------------ table-batched embedding (issue 16)

EMBEDDING_BATCHED_BAG_COST = 64.0
"""Work of one bag beyond its rows, in bytes-read equivalents (loading its offsets, zeroing and
storing the pooled row: about one 64-byte row's worth), used to balance the batched op's tasks
so that many short bags of one table weigh as much as a few long bags of another."""

EMBEDDING_BATCHED_TASKS_PER_THREAD = 4
"""Tasks of equal estimated work per thread in the batched op's parallel region.  The threads
take tasks from a shared counter, so a thread slowed down by another process (a 2-core box
that also compiles) hands its remaining tasks to the others; 4 bounds the leftover imbalance
to about a quarter of one thread's share at one atomic add per task.  Chosen by that
reasoning: on the busy box the 1/4/8/16 timings were within their noise of each other."""

# ------------------------------------------------------------- GEMM per-call fast path

GEMM_FAST_ENTRIES = 16
"""Replayable calls (``qgemm.gemm._Fast``, ``qgemm._half._Fast``) kept per weight and wrapper,
one per input shape; the memo is emptied at once when full.  A layer sees a handful of batch
shapes; 16 covers DLRM serving's M = 1..16 without holding more than a few hundred bytes of
entries (plus references to the biases they were made with) per weight."""

# ------------------------------------------------------- numpy generic tier (issue 12)

GENERIC_GEMM_CHUNK_ELEMS = 1 << 21
"""Elements of the largest temporary per row chunk of the numpy generic GEMM (float64/int64
rows of the product, the saturating pairs: 16 MiB); chosen to bound memory, not measured --
the BLAS matmul's speed is flat from a few thousand rows x K on."""

GENERIC_QUANTIZE_CHUNK_ELEMS = 1 << 20
"""Elements per chunk of the numpy generic (de)quantize and rowwise kernels (a few MiB of
float32 temporaries per pass); chosen to bound memory: 1M x 64 rows ran in ~1 s with it on 2
busy cores, the same as in one piece."""

GENERIC_EMBEDDING_CHUNK_ELEMS = 1 << 18
"""Output elements (bags x dim) per chunk of the numpy generic embedding-bag kernel: its
float32/float64 temporaries (one gathered row per bag and pooled position, the accumulator)
stay at a few MiB; chosen to bound memory, not measured."""
