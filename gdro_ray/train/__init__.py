"""Training: the GDRO step on a model adapter, batches from stored groups, and the Ray Train loop."""
