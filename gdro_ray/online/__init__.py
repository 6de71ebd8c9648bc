"""The online baseline: Flow-GRPO on the same model adapter, rewards and Ray Train workers as GDRO."""
