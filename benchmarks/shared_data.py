"""Where the benchmarks find the reference logs: ../shared/data beside the checkout (never
committed into the project; see its README for the files and the evaluation protocol)."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
