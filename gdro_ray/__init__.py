"""gdro-ray: offline GDRO post-training of rectified-flow text-to-image models on Ray."""

import os

# transformers warns about optional packages as it loads, before any job can parse --verbose: below errors
# it stays quiet unless GDRO_VERBOSE=1 (gdro_ray.console shows the rest of its output with --verbose).
if os.environ.get("GDRO_VERBOSE") != "1":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
