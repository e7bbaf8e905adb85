"""The in-flight engine: the step loop (`engine`), the scheduler (`scheduler`) over the KV block
manager (`block_manager`), sequences (`sequence`), sampling (`sampling`, `sampling_params`) and
the types the engine hands out (`outputs`).

Pure Python but for the step loop and the sampler, which run tensors: importing the package
(or `outputs`, `scheduler`, `block_manager`, `sequence`, `sampling_params`) loads no torch, so
the server can use those types before the model is loaded. The engine defines the `Runner`
protocol that `inflightd.runtime` implements; it never imports the runtime or the models."""
