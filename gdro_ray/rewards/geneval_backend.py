"""The GenEval reward's models on transformers: a COCO object detector and a CLIP colour classifier.

GenEval itself runs an mmdetection Mask2Former and open_clip's ViT-L/14; see the README for how this
backend differs. Weights load as safetensors only, never with remote code; both classes also wrap models
already built in memory, which is how the tests run them on tiny random configs.
"""

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection, AutoProcessor, CLIPModel

from gdro_ray.rewards.geneval import (
    DEFAULT_CLIP_ID, DEFAULT_DETECTOR_ID, GENEVAL_CLASSES, GENEVAL_COLORS, ColorClassifier, Detection, Detector,
)
from gdro_ray.rewards.loading import load_pretrained

# GenEval's zero-shot colour prompts, and the grey ("#999") it pastes a masked object onto.
COLOR_TEMPLATES = ("a photo of a {color} {label}", "a photo of a {color}-colored {label}", "a photo of a {color} object")
GREY_BACKGROUND = (153, 153, 153)

# Detector label spellings that differ from GenEval's names: COCO's short names, and the older
# mmdetection / Pascal VOC spellings that some converted checkpoints (RT-DETR's among them) carry.
LABEL_ALIASES = {
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "hair dryer": "hair drier",
}


def geneval_class(label: str) -> str | None:
    """GenEval's name for a detector's class label, or None for a class GenEval does not use."""
    name = " ".join(label.lower().replace("_", " ").replace("-", " ").split())
    name = LABEL_ALIASES.get(name, name)
    return name if name in GENEVAL_CLASSES else None


class TransformersDetector(Detector):
    """A COCO detector from transformers' AutoModelForObjectDetection (RT-DETR, DETR, YOLOS, ...).

    Returns every detection the model's post-processing gives (threshold 0), keeping the classes GenEval
    names; boxes only (masks are None), so colours are read from box crops.
    """

    def __init__(self, model: torch.nn.Module, processor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.classes = {
            int(index): name for index, label in model.config.id2label.items() if (name := geneval_class(label))
        }
        if not self.classes:
            raise ValueError(f"detector {model.config.name_or_path or type(model).__name__} has no label among GenEval's 80 COCO classes")

    @classmethod
    def from_pretrained(
        cls, source: str = DEFAULT_DETECTOR_ID, device: str | torch.device = "cpu", revision: str | None = None
    ) -> "TransformersDetector":
        return cls(*load_pretrained(AutoModelForObjectDetection, AutoImageProcessor, source, revision), device=device)

    @torch.no_grad()
    def detect(self, image: Image.Image) -> list[Detection]:
        image = image.convert("RGB")
        width, height = image.size
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        found = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(height, width)])[0]
        detections = []
        for score, index, box in zip(found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist()):
            if index in self.classes:
                detections.append(Detection(self.classes[index], score, _inside(box, width, height)))
        return detections


def _inside(box: list[float], width: int, height: int) -> tuple[float, float, float, float]:
    # Predicted boxes may overhang the image; a crop beyond it would add black to the colour crop.
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def object_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """GenEval's colour crop: the object's mask pasted onto grey, cut to its box; a plain box crop when
    there is no mask. At least one pixel, even for a degenerate box."""
    image = image.convert("RGB")
    if detection.mask is not None:
        if detection.mask.shape != (image.height, image.width):
            raise ValueError(f"mask of shape {detection.mask.shape} for an image of {image.height}x{image.width}")
        grey = Image.new("RGB", image.size, GREY_BACKGROUND)
        image = Image.composite(image, grey, Image.fromarray(detection.mask.astype(bool)))
    x0, y0, x1, y1 = (round(v) for v in detection.box)
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class ClipColorClassifier(ColorClassifier):
    """CLIP zero-shot over GenEval's 10 colours, with its 3 prompt templates per colour."""

    def __init__(self, model: CLIPModel, processor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self._color_prompts: dict[str, torch.Tensor] = {}  # class name -> (colours, dim) text embeddings

    @classmethod
    def from_pretrained(
        cls, source: str = DEFAULT_CLIP_ID, device: str | torch.device = "cpu", revision: str | None = None
    ) -> "ClipColorClassifier":
        return cls(*load_pretrained(CLIPModel, AutoProcessor, source, revision), device=device)

    @torch.no_grad()
    def classify(self, image: Image.Image, detections: list[Detection]) -> list[str]:
        if not detections:
            return []
        crops = [object_crop(image, detection) for detection in detections]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        crop_embeddings = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return [
            GENEVAL_COLORS[int((self._color_embeddings(detection.label) @ embedding).argmax())]
            for detection, embedding in zip(detections, crop_embeddings)
        ]

    def _color_embeddings(self, label: str) -> torch.Tensor:
        """Per colour, the normalised mean of its templates' normalised text embeddings (CLIP's usual
        zero-shot classifier, as GenEval builds it through clip_benchmark), cached per class."""
        if label not in self._color_prompts:
            prompts = [t.format(color=c, label=label) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            tokens = self.processor.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
            text = F.normalize(self.model.get_text_features(**tokens).pooler_output, dim=-1)
            per_color = text.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._color_prompts[label] = F.normalize(per_color, dim=-1)
        return self._color_prompts[label]
