"""Many users' LoRA adapters on one base model: the multi-adapter layer, the live adapters and
their optimizer state, which of them sit on the accelerator, and their files (PEFT format)."""
