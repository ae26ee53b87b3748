"""Models: the decoder LM, the CALM composition, LoRA adapters."""

# Modules of this package that build a whole LM (config field `.model`).
LM_MODULES = ('transformer',)
