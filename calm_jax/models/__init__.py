"""Models: the decoder LM, the CALM composition and our bridges, LoRA."""
