"""Running the model over the paged KV cache: a step's tensors and forward (`model_runner`),
the cache tensors and their sizing (`paged_cache`), the CPU settings read from config
and environment (`settings`), and the OpenMP spin policy (`omp_spin`). Implements the engine's
`Runner` protocol."""
