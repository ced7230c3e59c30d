"""``python -m benchmarks [--quick] ...`` from the repository root: the same suite as ``fastsae bench``;
``python -m benchmarks quality [--quick] ...`` the training-quality sweep (``fastsae bench --only quality``)."""
import sys

from fastsae.bench import main

if __name__ == "__main__":
    sys.exit(main())
