"""The model: its hyper-parameters (`config`), the Llama-family forward as functions of tensors
(`llama`), reading GGUF files (`gguf_file`) and loading them or Hugging Face folders (`loader`,
`dequant`), the CPU fast paths and their settings (`cpu_paths`, `cpu_settings`), and the
contiguous reference attention the paged kernels are checked against (`reference_cache`)."""
