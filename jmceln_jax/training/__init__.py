"""Training: the model state (built, initialised, restored), the pure jitted
steps, the loss, the optimiser, sharding, checkpoints and the loop."""
