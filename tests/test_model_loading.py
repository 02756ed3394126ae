"""Model sources: MLX directories (fp16, bf16, quantized), the Hugging Face cache layout
(offline), and clear failures for every way a model can be wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generate_step
from mlx_lm.utils import quantize_model

from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import load, model_name_for
from mlx_server.errors import ModelLoadError
from mlx_server.messages import Admit, GenerationRequest, SamplingParams, TokenOut
from mlx_server.testing.server import free_port, run_server
from mlx_server.testing.tiny import build_tiny_model, default_tokenizer, save_model_dir


def greedy_tokens(model_dir: Path, n: int = 12) -> tuple[list[int], list[int]]:
    """(our engine's tokens, mlx-lm's tokens) for one chat prompt."""
    ref_model, ref_tok = mlx_lm.load(str(model_dir))
    prompt = ref_tok.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=True
    )
    ref = [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt), ref_model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
        )
    ]
    loaded = load(str(model_dir))
    engine = BatchEngine(loaded.model, eos_token_ids=[], vocab_size=loaded.tokenizer.vocab_size)
    engine.admit(
        Admit(
            request=GenerationRequest(
                request_id="r",
                prompt_ids=tuple(prompt),
                sampling=SamplingParams(temperature=0),
                max_tokens=n,
            )
        )
    )
    ours: list[int] = []
    while engine.has_work:
        ours += [e.token_id for e in engine.step() if isinstance(e, TokenOut)]
    return ours, ref


@pytest.mark.slow  # runs long: several seconds of CPU
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dir(tmp_path: Path, dtype: str) -> None:
    model, config = build_tiny_model(tmp_path / "m32")
    model.update(tree_map(lambda p: p.astype(getattr(mx, dtype)), model.parameters()))
    save_model_dir(tmp_path / dtype, model, {**config, "torch_dtype": dtype}, default_tokenizer())
    ours, ref = greedy_tokens(tmp_path / dtype)
    assert ours == ref


@pytest.mark.slow  # runs long: several seconds of CPU
def test_quantized_dir(tmp_path: Path) -> None:
    model, config = build_tiny_model(tmp_path / "m32")
    model, config = quantize_model(model, config, group_size=32, bits=4)
    save_model_dir(tmp_path / "q4", model, config, default_tokenizer())
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    ours, ref = greedy_tokens(tmp_path / "q4")
    assert ours == ref


def hf_cache_layout(cache: Path, repo_id: str, src: Path) -> Path:
    """Lay out a model the way huggingface_hub's cache does (blobs, snapshots, refs)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in src.iterdir():
        blob = repo_dir / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    return repo_dir


@pytest.mark.slow  # starts a process
def test_hub_repo_id_served_from_local_cache_offline(tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "src")
    cache = tmp_path / "hub"
    repo_dir = hf_cache_layout(cache, "tiny-org/tiny-llama", tmp_path / "src")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    with run_server(
        ["--model", "tiny-org/tiny-llama"], env=env, log_path=tmp_path / "log"
    ) as server:
        models = httpx.get(f"{server.base_url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny-org/tiny-llama"]
        r = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={
                "model": "tiny-org/tiny-llama",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text
    # A path into the cache names the model by its repo id too.
    assert model_name_for(str(repo_dir)) == "tiny-org/tiny-llama"
    assert load(str(repo_dir)).config["model_type"] == "llama"


def start_fails(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    import os

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(tmp_path / "empty-hub"),
            **(env or {}),
        },
    )
    assert proc.returncode not in (0, None), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.slow  # starts a process
def test_missing_path_fails_clearly(tmp_path: Path) -> None:
    err = start_fails(["--model", str(tmp_path / "nope")], tmp_path)
    assert "does not exist" in err and "nope" in err


@pytest.mark.slow  # starts a process
def test_unknown_repo_fails_clearly(tmp_path: Path) -> None:
    err = start_fails(["--model", "no-such-org/no-such-model"], tmp_path)
    assert "no-such-org/no-such-model" in err


@pytest.mark.slow  # starts a process
@pytest.mark.slow  # starts a process
def test_model_type_mlx_lm_cannot_run_is_refused_at_start(tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError, match=r"model_type 'no_such_arch' is not an architecture mlx-lm"
    ):
        load(str(tmp_path / "m"))
    err = start_fails(["--model", str(tmp_path / "m")], tmp_path)
    assert "no_such_arch" in err and "mlx-lm" in err
    del cfg["model_type"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="names no model_type"):
        load(str(tmp_path / "m"))


@pytest.mark.slow  # starts a process
def test_corrupt_files_fail_clearly(tmp_path: Path) -> None:
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    err = start_fails(["--model", str(bad_gguf)], tmp_path)
    assert "bad.gguf" in err

    build_tiny_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors at all")
    err = start_fails(["--model", str(tmp_path / "m")], tmp_path)
    assert "model.safetensors" in err and "not a safetensors file" in err

    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load(str(tmp_path / "m"))


def test_memory_estimate_from_headers_and_refusal(tmp_path: Path) -> None:
    from mlx_server.engine.memory import check_fits, weights_bytes

    model, _ = build_tiny_model(tmp_path / "m")
    expected = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    assert weights_bytes(tmp_path / "m") == expected
    check_fits(expected, "m", available=expected * 2)
    with pytest.raises(ModelLoadError, match=r"needs about .* GiB .* only .* GiB is available"):
        check_fits(expected, "m", available=expected)
    # A header claiming more than the machine has is refused before any weight is read.
    import struct

    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 0]}}
    )
    (tmp_path / "m" / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode()
    )
    with pytest.raises(ModelLoadError, match=r"only .* GiB is available"):
        load(str(tmp_path / "m"))
