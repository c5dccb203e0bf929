"""optimum-neuron-peft: tensor-parallel LoRA fine-tuning of Llama-family models."""

__version__ = "0.1.0"
