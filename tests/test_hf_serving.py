"""A plain Hugging Face Llama directory (built by transformers, no kilnlm file, no manifest)
serves, scores, chats and evaluates: greedy tokens and Score log-probs equal transformers' on the
same directory, in-process, through gRPC and through the OpenAI HTTP API; chat renders the
directory's own template as ``apply_chat_template`` does.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import torch
from hf_llama import TEXT, make_hf_llama

from kilnlm import checkpoint
from kilnlm.actors.protocol import GenerationRequest, ScoreRequest, merge_chunks
from kilnlm.engine import EngineConfig
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig

transformers = pytest.importorskip("transformers")

PROMPT = "The potter shapes"
CHAT = [{"role": "user", "content": "What does the kiln do?"}]
N_NEW = 24
ENGINE = EngineConfig(kv_budget_mib=8, max_num_seqs=8, max_tokens_limit=128)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp("hfserve") / "llama")


@pytest.fixture(scope="module")
def reference(hf_dir):
    """transformers on the same directory: greedy continuations and the text's log-probs."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def greedy(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, pad_token_id=0
            )
        return out[0, len(ids) :].tolist()

    prompt_ids = tok(PROMPT).input_ids
    chat_ids = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False))
    score_ids = tok(TEXT).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([score_ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(score_ids[1:])[:, None])[:, 0]
    return {
        "prompt_ids": prompt_ids,
        "completion": greedy(prompt_ids),
        "chat_ids": chat_ids,
        "chat": greedy(chat_ids),
        "score_ids": score_ids[1:],
        "score": logprobs.tolist(),
        "decode": tok.decode,
    }


def test_serving_adopts_the_directory_and_matches_transformers(hf_dir, reference):
    """In-process ServingModel: the manifest is computed on first load, then checked."""
    from kilnlm.actors.serving_model import ServingModel

    async def run() -> tuple:
        model = ServingModel(ServeConfig(http_port=0, engine=ENGINE))
        await model.load(str(hf_dir))
        try:
            greedy = SamplingParams(temperature=0, max_tokens=N_NEW)
            out = []
            for kw in ({"prompt": PROMPT}, {"messages": CHAT}):
                request = GenerationRequest(request_id="r", params=greedy, **kw)
                out.append(merge_chunks([c async for c in model.generate(request)]))
            score = await model.score(ScoreRequest(text=TEXT))
        finally:
            model.shutdown()
        return (*out, score)

    completion, chat, score = asyncio.run(run())
    assert completion.token_ids == reference["completion"]
    assert completion.finish.prompt_tokens == len(reference["prompt_ids"])  # BOS added
    assert chat.token_ids == reference["chat"]
    assert chat.finish.prompt_tokens == len(reference["chat_ids"])  # the template's own text
    assert score.token_ids == reference["score_ids"]
    assert score.logprobs == pytest.approx(reference["score"], abs=1e-4)
    manifest = checkpoint.verify_manifest(hf_dir)  # written on adoption, checks from now on
    assert manifest.fields["source"] == "huggingface"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)


def test_a_file_changed_after_adoption_is_refused(hf_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    checkpoint.ensure_manifest(copy)
    (copy / "generation_config.json").write_text(json.dumps({"temperature": 2.0}))
    with pytest.raises(checkpoint.ChecksumError, match=r"generation_config\.json"):
        checkpoint.ensure_manifest(copy)


def test_kiln_eval_accepts_its_tokenizer(hf_dir, reference, tmp_path, capsys):
    from kilnlm.cli import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--checkpoint", str(hf_dir), "--text", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == [1, *reference["score_ids"]]  # <s> first, as transformers
    assert result["token_logprobs"] == pytest.approx(reference["score"], abs=1e-4)


# --------------------------------------------------------------------------------------------
# Through Ray Serve: gRPC and HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed(ray_cluster, hf_dir):
    from ray import serve

    from kilnlm.actors import serve_app

    serve.shutdown()  # Serve's one HTTP proxy: started here with this module's port
    config = ServeConfig(
        checkpoint=str(hf_dir), port=0, http_port=_free_port(), app_name="kiln-test-hf",
        engine=ENGINE, served_model_name="llama", health_poll_s=0.1,
    )  # fmt: skip
    address = serve_app.run(config)
    yield address, serve_app.http_url(config)
    serve.delete("kiln-test-hf")
    serve.shutdown()


@pytest.mark.ray
def test_grpc_and_http_equal_transformers(deployed, reference):
    import openai

    from kilnlm.client import Client

    address, url = deployed
    with Client(address, timeout=120) as c:
        completion = c.generate(PROMPT, max_tokens=N_NEW, temperature=0)
        chat = c.chat(CHAT, max_tokens=N_NEW, temperature=0)
        score = c.score(TEXT)
    assert completion.token_ids == reference["completion"]
    assert chat.token_ids == reference["chat"]
    assert score.logprobs == pytest.approx(reference["score"], abs=1e-4)
    http = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    reply = http.chat.completions.create(
        model="llama", messages=CHAT, max_tokens=N_NEW, temperature=0
    )
    assert reply.choices[0].message.content == chat.text
    assert reply.usage.prompt_tokens == len(reference["chat_ids"])
    text = http.completions.create(model="llama", prompt=PROMPT, max_tokens=N_NEW, temperature=0)
    assert text.choices[0].text == completion.text
    assert text.choices[0].text == reference["decode"](reference["completion"])


def test_a_replica_that_cannot_load_shuts_down_without_a_second_error(tmp_path):
    """Serve calls __del__ on a replica whose __init__ raised: it must stop only what started."""
    from kilnlm.actors.server import LLMServer

    (tmp_path / "config.json").write_text(json.dumps({"kilnlm": {}}))  # ours, no manifest
    cls = LLMServer.func_or_class
    replica = cls.__new__(cls)
    config = ServeConfig(checkpoint=str(tmp_path), http_port=0, engine=ENGINE)
    with pytest.raises(checkpoint.IncompleteCheckpointError, match="manifest"):
        asyncio.run(replica.__init__(config))
    asyncio.run(replica.__del__())  # was: AttributeError: no attribute '_metrics_task'


def test_kiln_serve_says_why_a_checkpoint_cannot_serve_in_one_line(tmp_path, capsys):
    from kilnlm.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"kilnlm": {}}))  # ours, no manifest
    assert main(["serve", "--checkpoint", str(tmp_path), "--port", "0", "--http-port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln serve: error: ") and "manifest" in err
    assert len(err.splitlines()) == 1


def test_the_orchestrator_registers_and_promotes_it(hf_dir, tmp_path, reference):
    """register computes the manifest; the gate and the hot-swap serve the directory."""
    import shutil

    from kilnlm.actors.admin import status_pb
    from kilnlm.actors.orchestrator import Orchestrator, OrchestratorConfig
    from kilnlm.actors.serving_model import ServingModel
    from kilnlm.actors.swap_agent import DirectLink, SwapAgent
    from kilnlm.cli.admin import format_status

    fresh = tmp_path / "llama"
    shutil.copytree(hf_dir, fresh, ignore=shutil.ignore_patterns("manifest.json"))
    (tmp_path / "heldout.txt").write_text(TEXT * 2, encoding="utf-8")
    cfg = OrchestratorConfig(
        storage_path=str(tmp_path / "registry"), heldout=str(tmp_path / "heldout.txt"),
        max_ppl_increase=10.0, poll_timeout_s=0.3, replica_timeout_s=3.0,
        stage_timeout_s=60.0, commit_timeout_s=30.0, check_serve=False,
    )  # fmt: skip

    async def body() -> tuple[list[int], str]:
        orchestrator = Orchestrator(cfg)
        model = ServingModel(ServeConfig(http_port=0, engine=ENGINE))
        agent = SwapAgent(model, DirectLink(orchestrator), "r0")
        await agent.start(sync_timeout_s=30)
        try:
            version = await orchestrator.register(str(fresh))
            await orchestrator.promote(version)
            request = GenerationRequest(
                request_id="r", params=SamplingParams(temperature=0, max_tokens=N_NEW),
                prompt=PROMPT,
            )  # fmt: skip
            tokens = merge_chunks([c async for c in model.generate(request)]).token_ids
            # kiln status: the replica's heartbeat carries its energy and generated tokens
            for _ in range(400):
                (replica,) = (await orchestrator.status()).replicas
                if replica.generated_tokens >= N_NEW and replica.energy_joules > 0:
                    break
                await asyncio.sleep(0.05)
            return tokens, format_status(status_pb(await orchestrator.status()))
        finally:
            await agent.stop()
            model.shutdown()

    tokens, status = asyncio.run(body())
    assert tokens == reference["completion"]
    assert checkpoint.verify_manifest(fresh).fields["source"] == "huggingface"
    (energy,) = [line for line in status.splitlines() if line.startswith("energy: replicas")]
    assert "Wh per 1,000 generated tokens" in energy and "g CO2" in energy


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_that_cannot_load_is_one_line_from_run(ray_cluster, tmp_path):
    """Past the CLI's own check (another node, a race): Serve's error names only the failed
    deployment; run() says the replica's own reason in one line."""
    from ray import serve

    from kilnlm.actors import serve_app

    (tmp_path / "config.json").write_text(json.dumps({"kilnlm": {}}))  # ours, no manifest
    config = ServeConfig(
        checkpoint=str(tmp_path), port=0, http_port=0, app_name="kiln-test-bad", engine=ENGINE
    )
    try:
        with pytest.raises(serve_app.DeployError) as e:
            serve_app.run(config)
    finally:
        serve.delete("kiln-test-bad")
    message = str(e.value)
    assert "IncompleteCheckpointError" in message and "manifest" in message
    assert len(message.splitlines()) == 1


def test_every_eos_of_generation_config_ends_a_reply(hf_dir, tmp_path, reference):
    """Llama 3 style: generation_config.json lists a second EOS (here the token greedy decoding
    would produce third); the reply ends there, on gRPC as on HTTP (the replica applies it)."""
    import shutil

    from kilnlm.actors.serving_model import ServingModel

    third = reference["completion"][2]
    if third in reference["completion"][:2]:
        pytest.skip("the greedy continuation repeats its third token early")
    copy = tmp_path / "llama3ish"
    shutil.copytree(hf_dir, copy, ignore=shutil.ignore_patterns("manifest.json"))
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, third]}))

    async def run() -> object:
        model = ServingModel(ServeConfig(http_port=0, engine=ENGINE))
        await model.load(str(copy))
        try:
            greedy = SamplingParams(temperature=0, max_tokens=N_NEW)
            request = GenerationRequest(request_id="r", params=greedy, prompt=PROMPT)
            return merge_chunks([c async for c in model.generate(request)])
        finally:
            model.shutdown()

    out = asyncio.run(run())
    assert out.token_ids == reference["completion"][:2]  # the EOS itself is not returned
    assert out.finish.finish_reason == "stop"


@pytest.mark.ray
def test_generation_config_gives_the_defaults_on_grpc_and_http(deployed):
    """generation_config.json says temperature 0.6, top_p 0.9: a seeded request that leaves them
    out samples exactly as one that sets them, and not as the server's own defaults."""
    import openai

    from kilnlm.client import Client

    address, url = deployed
    with Client(address, timeout=120) as c:
        unset = c.generate(PROMPT, max_tokens=N_NEW, seed=11).token_ids
        model = c.generate(PROMPT, max_tokens=N_NEW, seed=11, temperature=0.6, top_p=0.9)
        server = c.generate(PROMPT, max_tokens=N_NEW, seed=11, temperature=1.0, top_p=1.0)
    assert unset == model.token_ids != server.token_ids
    http = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    text = http.completions.create(model="llama", prompt=PROMPT, max_tokens=N_NEW, seed=11)
    assert text.choices[0].text == model.text
