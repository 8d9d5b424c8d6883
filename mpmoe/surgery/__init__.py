"""Expert-surgery math (pure PyTorch/SciPy, no megatron import): merge, compress, split."""
