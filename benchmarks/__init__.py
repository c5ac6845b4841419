"""pneumoscan's benchmark scripts (run from the repository root).

``python -m benchmarks train|predict|serve|quantize ...`` is the same harness as
``pneumoscan benchmark ...`` (:mod:`pneumoscan.bench`); ``benchmarks/load.py`` load-tests a
running ``pneumoscan serve``. Results and commands are tabulated in ``docs/benchmarks.md``.
"""
