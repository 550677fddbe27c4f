"""What a failed model computation tells its client.

Out of memory is the failure a shared server must survive best: one user's oversized
request must fail alone, with a reason the user can act on, and leave the memory it
grabbed for everyone else.
"""

from __future__ import annotations

import torch

from thinker.core.errors import RequestFailedError


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's refusal."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(exc)


def explain(exc: BaseException, what: str) -> BaseException:
    """``exc`` as the job's failure: out of memory becomes a RequestFailedError naming the
    request's size (``what``), after handing cached accelerator memory back."""
    if not is_out_of_memory(exc):
        return exc
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return RequestFailedError(
        f"out of memory running {what}; other requests were not affected. Send fewer or shorter sequences "
        f"(or fewer samples) per request. ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    )
