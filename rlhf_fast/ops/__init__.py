"""Public ops, one per file: launcher, autograd.Function, torch.library registration, functional API."""
