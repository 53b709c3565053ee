"""The engine core, the engine thread and the bridge import no torch: only the model runner side does."""

from __future__ import annotations

import subprocess
import sys

CORE = (
    "engine_worker.engine",
    "engine_worker.engine_loop",
    "engine_worker.bridge",
    "engine_worker.sim",
    "engine_worker.output_builder",
    "engine_worker.validation",
    "engine_worker.speculative",
    "engine_worker.intake",
    "engine_worker.prefix_cache",
    "engine_worker.prefix_caching",
)


def test_the_engine_core_imports_no_torch() -> None:
    code = f"import sys\nfor m in {CORE!r}: __import__(m)\nprint(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
