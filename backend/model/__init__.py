"""The shared base model: loading it (hub, local folder, builtin-tiny fallback), wrapping its
layers for LoRA, and the small generated models used by tests and benchmarks."""
