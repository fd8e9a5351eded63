"""Distillation: the swapped model trained against its frozen original (the loop, its checkpoints, the losses)."""
