"""Training: examples (tokens, targets, weights), the fused forward/backward over many
adapters' requests, the loss functions, and the memory-light output head."""
