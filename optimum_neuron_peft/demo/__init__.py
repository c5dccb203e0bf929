"""The end-to-end demo: tiny model -> tensor-parallel LoRA training -> consolidation -> vanilla PEFT -> merging."""
