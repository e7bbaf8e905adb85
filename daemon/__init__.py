"""inflightd: a single-node LLM inference daemon with a pure-Python control plane."""
