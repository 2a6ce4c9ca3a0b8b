"""Table kinds, pooling modes and the error codes shared by the embedding kernels
(:mod:`qgemm._kernels.embedding`) and their numpy generic tier
(:mod:`qgemm._kernels.embedding_generic`); imports nothing, so the numpy tier loads without
Numba.

The kernels return ``(code, position, value)``; :func:`qgemm.embedding.bag_error` is the one
place that words a code as an exception.
"""

from __future__ import annotations

__all__ = [
    "KINDS",
    "MODES",
    "OK",
    "BAD_INDEX",
    "BAD_FIRST_OFFSET",
    "DECREASING_OFFSET",
    "OFFSET_PAST_END",
    "NEGATIVE_LENGTH",
    "LENGTHS_SUM",
    "ERRORS",
]

KINDS = ("float32", "float16", "rowwise8", "rowwise4", "rowwise2")
MODES = ("sum", "mean", "max")

OK = 0
BAD_INDEX = 1
BAD_FIRST_OFFSET = 2
DECREASING_OFFSET = 3
OFFSET_PAST_END = 4
NEGATIVE_LENGTH = 5
LENGTHS_SUM = 6
ERRORS = {
    BAD_INDEX: "index out of range",
    BAD_FIRST_OFFSET: "offsets[0] is not 0",
    DECREASING_OFFSET: "offsets decrease",
    OFFSET_PAST_END: "offset past the end of indices",
    NEGATIVE_LENGTH: "negative length",
    LENGTHS_SUM: "lengths do not add up to the number of indices",
}
