"""Reading and writing checkpoints: lazy tensor handles, safe torch.save reading, optimum-neuron layouts."""
