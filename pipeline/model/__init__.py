"""The network and what runs it: build, checkpoints, runtime/DDP, transforms, losses, metrics, post-processing."""
