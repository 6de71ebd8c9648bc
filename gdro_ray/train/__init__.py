"""Training: the GDRO step on a model adapter, and (later) its Ray Train wiring."""
