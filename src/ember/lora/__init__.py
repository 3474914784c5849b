"""Multi-LoRA serving: PEFT adapters in slots of every adaptable linear, picked per row of a batch."""
