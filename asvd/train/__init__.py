"""Training: rollouts through the inference transition (and, next, the DMD/teacher stages)."""
