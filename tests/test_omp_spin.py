"""The OpenMP spin governor's thread lifecycle (its effect is measured by
benchmarks/step_profile.py and benchmarks/qgemv.py, not here)."""
from __future__ import annotations

import gc
import threading

from inflightd.runtime.omp_spin import SpinGovernor


def _parked() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "inflightd-omp-throttle"]


def test_throttle_parks_one_thread_and_spin_lets_it_go() -> None:
    before = len(_parked())
    g = SpinGovernor()
    assert g.spinning
    g.throttle()
    g.throttle()  # idempotent: still one parked thread
    assert not g.spinning and len(_parked()) == before + 1
    g.spin()
    assert g.spinning and len(_parked()) == before
    g.throttle()
    g.close()
    assert len(_parked()) == before


def test_collected_governor_releases_its_thread() -> None:
    before = len(_parked())
    g = SpinGovernor()
    g.throttle()
    assert len(_parked()) == before + 1
    del g
    gc.collect()
    assert len(_parked()) == before
