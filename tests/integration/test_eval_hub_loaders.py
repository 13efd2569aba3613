"""Benchmark loaders against a loopback dataset hub: the HTTP endpoints huggingface_hub calls (tree listing,
resolve HEAD/GET) and ModelScope's dataset file API, serving small parquet files in the real repositories' layouts.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.core.errors import NotFound
from services.evaluation.benchmarks import DataSource, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PARQUET_REV = "refs/convert/parquet"


def parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


MMLU_TEST = [
    {"question": "What is 2 + 2?", "subject": "abstract_algebra", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Order of Z_4?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"], "answer": 3},
]
MMLU_DEV = [
    {"question": f"Dev question {i}?", "subject": "abstract_algebra", "choices": ["a", "b", "c", "d"], "answer": i % 4}
    for i in range(5)
]
ARC_TEST = [
    {
        "id": "Mercury_1",
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
]
HELLASWAG_VAL = [
    {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
    }
]
GSM8K_TEST = [{"question": "Tom has 3 apples and buys 2 more. How many apples?", "answer": "3 + 2 = 5\n#### 5"}]
GSM8K_TRAIN = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]

REPOS: dict[tuple[str, str], dict[str, bytes]] = {
    ("cais/mmlu", "main"): {
        "abstract_algebra/test-00000-of-00001.parquet": parquet(MMLU_TEST),
        "abstract_algebra/dev-00000-of-00001.parquet": parquet(MMLU_DEV),
        "anatomy/test-00000-of-00001.parquet": parquet(MMLU_TEST),
        "README.md": b"# mmlu",
    },
    ("allenai/ai2_arc", "main"): {
        "ARC-Easy/test-00000-of-00001.parquet": parquet(ARC_TEST),
        "ARC-Challenge/test-00000-of-00001.parquet": parquet(ARC_TEST),
    },
    # a script-era repository: only the hub's parquet export holds the data
    ("Rowan/hellaswag", "main"): {"hellaswag.py": b"# loading script", "README.md": b"# hellaswag"},
    ("Rowan/hellaswag", PARQUET_REV): {"default/validation/0000.parquet": parquet(HELLASWAG_VAL)},
    ("openai/gsm8k", "main"): {
        "main/test-00000-of-00001.parquet": parquet(GSM8K_TEST),
        "main/train-00000-of-00001.parquet": parquet(GSM8K_TRAIN),
    },
}


class _Hub(BaseHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, send_body=True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _route(self, send_body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        path = urllib.parse.unquote(self.path.split("?")[0])
        if path.startswith("/api/datasets/"):  # /api/datasets/{org}/{name}/tree/{revision}[/{path}]
            rest = path[len("/api/datasets/") :]
            for (repo, rev), files in REPOS.items():
                if rest == f"{repo}/tree/{rev}" or rest == f"{repo}/tree/{rev}/":
                    listing = [
                        {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for p, d in sorted(files.items())
                    ]
                    return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})
            known_repo = any(rest.startswith(f"{repo}/") for repo, _ in REPOS)
            code = "RevisionNotFound" if known_repo else "RepoNotFound"
            return self._send(404, b"{}", {"X-Error-Code": code, "Content-Type": "application/json"})
        if path.startswith("/datasets/"):  # /datasets/{org}/{name}/resolve/{revision}/{path}
            rest = path[len("/datasets/") :]
            for (repo, rev), files in REPOS.items():
                prefix = f"{repo}/resolve/{rev}/"
                if rest.startswith(prefix) and rest[len(prefix) :] in files:
                    data = files[rest[len(prefix) :]]
                    return self._send(
                        200,
                        data,
                        {
                            "X-Repo-Commit": COMMIT,
                            "Content-Type": "application/octet-stream",
                            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                        },
                        send_body,
                    )
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, send_body)
        if path.startswith("/api/v1/datasets/"):  # ModelScope: /api/v1/datasets/{ns}/{name}/repo[/tree]
            rest = path[len("/api/v1/datasets/") :]
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            for (repo, rev), files in REPOS.items():
                if rev != "main":
                    continue
                if rest == f"{repo}/repo/tree":
                    doc = {
                        "Code": 200,
                        "Data": {
                            "Files": [{"Path": p, "Type": "blob", "Size": len(d)} for p, d in sorted(files.items())]
                        },
                    }
                    return self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})
                if rest == f"{repo}/repo" and query.get("FilePath", [""])[0] in files:
                    return self._send(200, files[query["FilePath"][0]], {"Content-Type": "application/octet-stream"})
            return self._send(404, b'{"Code": 404, "Message": "dataset not found"}')
        self._send(404, b"", {"X-Error-Code": "RepoNotFound"})

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._route(send_body=True)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    # the suite sets HF_HUB_OFFLINE=1 before huggingface_hub is imported; this test talks to its own loopback hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    _Hub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_mmlu_subject_loads_through_the_hub_then_from_cache_without_a_request(hub, tmp_path):
    data = DataSource(cache_dir=tmp_path / "cache", hf_endpoint=hub)
    bench = resolve("mmlu:abstract_algebra", {"num_fewshot": "2"})
    docs = bench.load(data)
    assert [d["question"] for d in docs.test] == [r["question"] for r in MMLU_TEST]
    assert len(docs.fewshot) == 5
    assert any(r.startswith("GET /datasets/cais/mmlu/resolve/main/abstract_algebra/test-") for r in _Hub.requests)
    req = bench.build(docs.test[0], 0, bench.fewshot_examples(docs, docs.test[0], 2), chat=False)
    assert req.context.startswith(
        "The following are multiple choice questions (with answers) about abstract "
        "algebra.\n\nDev question 0?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\nDev question 1?"
    )
    assert req.context.endswith("What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:") and req.gold == 1

    _Hub.requests.clear()
    again = resolve("mmlu:abstract_algebra", {"num_fewshot": "2"}).load(data)
    assert again.test == docs.test and _Hub.requests == []
    offline = resolve("mmlu:abstract_algebra", {"num_fewshot": "2"}).load(
        DataSource(cache_dir=tmp_path / "cache", hf_endpoint="http://127.0.0.1:9", offline=True)
    )
    assert offline.test == docs.test


def test_a_partial_download_is_not_taken_as_cached(hub, tmp_path):
    data = DataSource(cache_dir=tmp_path / "cache", hf_endpoint=hub)
    resolve("arc_easy").load(data)
    marker = next((tmp_path / "cache").rglob("complete.json"))
    marker.unlink()  # as if the process died before the download finished
    _Hub.requests.clear()
    docs = resolve("arc_easy").load(data)
    assert docs.test[0]["answerKey"] == "B" and any(r.startswith("GET ") for r in _Hub.requests)


def test_arc_hellaswag_and_gsm8k_from_the_hub(hub, tmp_path):
    data = DataSource(cache_dir=tmp_path / "cache", hf_endpoint=hub)
    arc = resolve("arc_challenge")
    adocs = arc.load(data)
    areq = arc.build(adocs.test[0], 0, [], chat=False)
    assert areq.context == "Question: Which is a gas?\nAnswer:" and areq.continuations == [" ice", " steam", " rock"]
    assert areq.gold == 1

    hs = resolve("hellaswag")
    hdocs = hs.load(data)  # from the hub's parquet export branch
    hreq = hs.build(hdocs.test[0], 0, [], chat=False)
    assert hreq.context == "Roof shingle removal: A man is sitting on a roof. He" and hreq.gold == 3
    assert any("refs%2Fconvert%2Fparquet" in r or "refs/convert/parquet" in r for r in _Hub.requests)

    gsm = resolve("gsm8k", {"source": "hub", "num_fewshot": "2"})
    gdocs = gsm.load(data)
    assert gdocs.test == GSM8K_TEST and len(gdocs.fewshot) == 6
    greq = gsm.build(gdocs.test[0], 0, gsm.fewshot_examples(gdocs, gdocs.test[0], 2), chat=False)
    assert greq.prompt.endswith("Question: Tom has 3 apples and buys 2 more. How many apples?\nAnswer:")
    assert greq.prompt.count("####") == 2


def test_a_missing_repository_is_a_clear_not_found(hub, tmp_path):
    data = DataSource(cache_dir=tmp_path / "cache", hf_endpoint=hub)
    with pytest.raises(NotFound) as err:
        resolve("truthfulqa_mc1").load(data)  # truthfulqa/truthful_qa is not on this hub
    assert "truthfulqa/truthful_qa" in err.value.message and hub in err.value.message
    with pytest.raises(NotFound) as err:
        resolve("mmlu:astronomy").load(data)  # the repo exists, the subject does not
    assert "astronomy" in err.value.message
    assert not list((tmp_path / "cache").rglob("complete.json"))


def test_modelscope_dataset_file_api(hub, tmp_path):
    data = DataSource(cache_dir=tmp_path / "ms", modelscope_endpoint=hub, hub="modelscope")
    docs = resolve("arc_easy").load(data)
    assert docs.test[0]["question"] == "Which is a gas?"
    assert any(r.startswith("GET /api/v1/datasets/allenai/ai2_arc/repo/tree") for r in _Hub.requests)
    _Hub.requests.clear()
    assert resolve("arc_easy").load(data).test == docs.test and _Hub.requests == []
    with pytest.raises(NotFound):
        resolve("hellaswag").load(data)  # no parquet in the main tree of this repo on ModelScope
