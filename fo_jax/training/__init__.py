"""Training: losses, optimizers, train steps and loops for every stage."""
