"""``PeftModel.push_to_hub`` without a network: huggingface_hub's own client runs, with its HTTP transport replaced
by a recorder that answers as the Hub does, so the test sees exactly what would be uploaded."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from safetensors.torch import load

import graftkit
from tests.conftest import tiny_llama

huggingface_hub = pytest.importorskip("huggingface_hub")
httpx = pytest.importorskip("httpx2" if int(huggingface_hub.__version__.split(".")[0]) >= 2 else "httpx")

CARD = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nHand-written notes.\n"


class FakeHub:
    """Answers the Hub's endpoints that an upload uses; records every request."""

    def __init__(self, card: str | None = None) -> None:
        self.card = card
        self.requests: list[tuple[str, str, bytes]] = []
        self.tokens: dict[str, str | None] = {}

    def __call__(self, request):
        url = str(request.url)
        self.requests.append((request.method, url, request.content))
        self.tokens[url] = request.headers.get("authorization")
        if url.endswith("/api/repos/create"):
            body = json.loads(request.content)
            return httpx.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if "/resolve/" in url and url.endswith("/README.md"):
            if self.card is None:
                return httpx.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "not found"})
            data = self.card.encode()
            headers = {"ETag": '"card"', "X-Repo-Commit": "c" * 40, "Content-Length": str(len(data))}
            return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        if url.endswith("/api/validate-yaml"):
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in url:
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in url:
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/adapter/commit/" + "a" * 40,
                                             "commitOid": "a" * 40, "pullRequestUrl": None})
        return httpx.Response(404, json={"error": "not served by the fake Hub"})

    def committed(self) -> tuple[str, dict, dict[str, bytes]]:
        """(the commit URL, its header, path -> file bytes) of the one commit."""
        commits = [(url, body) for method, url, body in self.requests if "/commit/" in url and method == "POST"]
        assert len(commits) == 1
        url, body = commits[0]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines
                 if line["key"] == "file"}
        return url, header, files


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fakes = []

    def install(card: str | None = None) -> FakeHub:
        fake = FakeHub(card)
        fakes.append(fake)
        huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(fake)))
        _http.close_session()
        return fake

    yield install
    huggingface_hub.set_client_factory(_http.default_client_factory)
    _http.close_session()


def adapted():
    model = graftkit.get_peft_model(tiny_llama(), graftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = "org/base"
    return model


def test_push_uploads_the_saved_files_in_one_commit(hub):
    fake = hub()
    model = adapted()
    model.add_adapter("other", graftkit.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    info = model.push_to_hub("me/adapter", token="hf_test", commit_message="first", tags=["pirate"])
    assert info.oid == "a" * 40
    create = next(json.loads(body) for _, url, body in fake.requests if url.endswith("/api/repos/create"))
    assert (create["organization"], create["name"]) == ("me", "adapter")
    url, header, files = fake.committed()
    assert url.endswith("/api/models/me/adapter/commit/main") and header["summary"] == "first"
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                          "other/adapter_config.json", "other/adapter_model.safetensors"}
    uploaded = load(files["adapter_model.safetensors"])
    for key, tensor in graftkit.get_peft_model_state_dict(model).items():
        assert torch.equal(uploaded[key], tensor)
    assert load(files["other/adapter_model.safetensors"]).keys() == \
        graftkit.get_peft_model_state_dict(model, adapter_name="other").keys()
    assert json.loads(files["adapter_config.json"])["r"] == 2
    card = files["README.md"].decode()
    assert "library_name: peft" in card and "base_model: org/base" in card
    assert all(f"- {tag}" in card for tag in ("pirate", "graftkit", "lora"))
    assert {token for url, token in fake.tokens.items() if "/commit/" in url or "/repos/create" in url} == \
        {"Bearer hf_test"}


def test_push_keeps_the_repo_card_and_goes_to_the_branch_asked(hub):
    fake = hub(card=CARD)
    adapted().push_to_hub("me/adapter", token="hf_test", revision="dev")
    url, _, files = fake.committed()
    assert url.endswith("/api/models/me/adapter/commit/dev")
    card = files["README.md"].decode()
    assert "Hand-written notes." in card and "license: mit" in card and "- mine" in card
    assert "library_name: peft" in card and "- graftkit" in card
