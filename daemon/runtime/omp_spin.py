"""Turn OpenMP's spin-wait on and off while the process runs.

libgomp reads ``GOMP_SPINCOUNT`` once (inflightd sets 10000, ~0.1-0.2 ms, see __init__.py): how
long a worker spins after a parallel region before it sleeps. The two kinds of step want
opposite things:

- A step of up to ``CpuSettings.qgemm_max_tokens`` tokens (decode of a few sequences) runs ~120
  short Numba regions (one quantized product per linear, ``numba_kernels.cpu_qmatmul``) tens
  of µs apart: sleeping workers cost a ~60-110 µs
  wake-up each on this VM (``python benchmarks/qgemv.py``: 17.4 ms of products per token
  passive, 8.6 ms spinning).
- Every other step multiplies through OpenBLAS, whose own threads need both cores right after
  each Numba or torch region: OpenMP workers spinning there cost a batch-32 decode step ~17 %
  (``python benchmarks/step_profile.py --batch 32``: 148 tok/s spinning, 183 passive).

libgomp documents that once its pools hold more threads than there are CPUs it spins only ~100
iterations, and it checks that on every wait. So `throttle()` parks a thread that owns a worker
pool (one parallel region, then it blocks), which puts the process over the line; `spin()`
lets it exit, which frees its pool. Each switch costs a thread start or join (~0.1-0.3 ms) and
happens only when the kind of step changes.
"""
from __future__ import annotations

import threading
import weakref

import torch


def _release(parked: list[tuple[threading.Thread, threading.Event]]) -> None:
    while parked:
        thread, release = parked.pop()
        release.set()
        thread.join()


class SpinGovernor:
    """Owned by the thread that runs the steps; not thread-safe. The parked thread is let go
    when the governor is collected or the interpreter exits."""

    def __init__(self) -> None:
        self._parked: list[tuple[threading.Thread, threading.Event]] = []
        weakref.finalize(self, _release, self._parked)  # also runs at interpreter exit

    @property
    def spinning(self) -> bool:
        return not self._parked

    def spin(self) -> None:
        _release(self._parked)

    def throttle(self) -> None:
        if self._parked:
            return
        ready, release = threading.Event(), threading.Event()

        def park() -> None:
            # A parallel region (torch splits fills above 32768 elements): from here this thread
            # owns an OpenMP worker pool until it exits.
            torch.empty(1 << 17).fill_(1.0)
            ready.set()
            release.wait()

        t = threading.Thread(target=park, name="inflightd-omp-throttle", daemon=True)
        t.start()
        ready.wait()
        self._parked.append((t, release))

    def close(self) -> None:
        self.spin()
