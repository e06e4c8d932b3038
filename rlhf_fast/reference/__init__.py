"""Pure-PyTorch twins of every public op, with the same signatures: the CPU path and the test oracle."""
