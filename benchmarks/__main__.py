"""``python -m benchmarks [--quick] ...`` from the repository root: the same suite as ``fastsae bench``."""
import sys

from fastsae.bench import main

if __name__ == "__main__":
    sys.exit(main())
