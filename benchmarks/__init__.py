"""fastsae benchmarks. ``python -m benchmarks`` runs the suite (same options as ``fastsae bench``);
``pytest benchmarks --benchmark-only`` runs the CPU op benchmarks under pytest-benchmark."""
