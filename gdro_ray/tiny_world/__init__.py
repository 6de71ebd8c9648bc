"""The embedded tiny world: ground-truth renderers, prompt sets and rewards where a CPU-sized FLUX can
be imperfect in ways the task rewards measure (shapes for GenEval, glyphs for OCR)."""

from pathlib import Path

# The pretrained tiny FLUX shipped inside the package (jobs/pretrain_tiny.py makes it).
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
