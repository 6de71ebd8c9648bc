"""A quality judge that asks a scoring server of the user's own over HTTP.

Protocol: POST `url` with JSON {"images": [base64 PNG, ...], "metadata": [{...}, ...]}; the server
answers {"scores": [float, ...]}, one 1-5 rating per image. Credentials, when the server needs them,
come from an environment variable (never from files in the repo), sent as a bearer token.
"""

import base64
import io
import json
import math
import os
import urllib.error
import urllib.request

from PIL import Image

from gdro_ray.rewards.quality import QUALITY_SCALE, QualityJudge


class HTTPJudge(QualityJudge):
    def __init__(self, url: str, token_env: str | None = None, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {url!r}")
        if token_env is not None and not os.environ.get(token_env):
            raise ValueError(f"the judge's token variable {token_env!r} is not set in this environment")
        self.url, self.token_env, self.timeout = url, token_env, timeout

    def describe(self) -> str:
        return f"HTTPJudge({self.url})"

    def rate(self, images: list[Image.Image], metadata: list[dict]) -> list[float]:
        if len(images) != len(metadata):
            raise ValueError(f"got {len(images)} images for {len(metadata)} metadata records")
        body = json.dumps({"images": [_png_base64(image) for image in images], "metadata": metadata}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token_env is not None:
            headers["Authorization"] = f"Bearer {os.environ[self.token_env]}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as error:
            raise RuntimeError(f"judge server {self.url} gave no usable answer: {error}") from error
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(images):
            raise RuntimeError(f"judge server {self.url} must answer {{'scores': [...]}} with {len(images)} numbers, "
                               f"got {str(answer)[:200]}")
        low, high = QUALITY_SCALE
        for score in scores:
            if not isinstance(score, (int, float)) or math.isnan(score) or not low <= score <= high:
                raise RuntimeError(f"judge server {self.url} gave {score!r}, outside the {low}-{high} scale")
        return [float(score) for score in scores]


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
