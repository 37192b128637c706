"""Planning a run before any work: the cost model (time per block and per run), its memory side
(bytes per worker), this machine's rates measured by micro-benchmarks, and the recipe checked
against the model (`preflight`)."""
