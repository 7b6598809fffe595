"""The ZO engine: blocks, seeded directions, perturbed forwards, optimizers."""
