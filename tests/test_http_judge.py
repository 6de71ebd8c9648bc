import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image

from gdro_ray.rewards.http_judge import HTTPJudge


class ScoringServer(BaseHTTPRequestHandler):
    """Rates an image 1 + 4 x its mean brightness; answers with whatever `reply` the test sets."""

    reply = None

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ScoringServer.seen_token = self.headers.get("Authorization")
        images = [Image.open(io.BytesIO(base64.b64decode(data))).convert("L") for data in request["images"]]
        scores = [1 + 4 * sum(image.getdata()) / (255 * image.width * image.height) for image in images]
        answer = ScoringServer.reply if ScoringServer.reply is not None else {"scores": scores}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), ScoringServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    ScoringServer.reply = None
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score"
    httpd.shutdown()


def test_ratings_come_from_the_server(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TOKEN", "secret")
    judge = HTTPJudge(server, token_env="JUDGE_TOKEN")
    images = [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8), (0, 0, 0))]
    assert judge.rate(images, [{"prompt": "a"}, {"prompt": "b"}]) == [5.0, 1.0]
    assert ScoringServer.seen_token == "Bearer secret"


@pytest.mark.parametrize("reply, message", [({"scores": [7.0]}, "outside the 1.0-5.0 scale"),
                                            ({"scores": []}, "must answer"), (["oops"], "must answer")])
def test_a_bad_answer_is_refused(server, reply, message):
    ScoringServer.reply = reply
    with pytest.raises(RuntimeError, match=message):
        HTTPJudge(server).rate([Image.new("RGB", (8, 8))], [{}])


def test_bad_settings_and_unreachable_servers_are_named():
    with pytest.raises(ValueError, match="must start with http"):
        HTTPJudge("ftp://example")
    with pytest.raises(ValueError, match="'NO_SUCH_TOKEN' is not set"):
        HTTPJudge("http://127.0.0.1:9", token_env="NO_SUCH_TOKEN")
    with pytest.raises(RuntimeError, match="gave no usable answer"):
        HTTPJudge("http://127.0.0.1:9/score", timeout=2).rate([Image.new("RGB", (8, 8))], [{}])
