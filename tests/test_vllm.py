"""The vLLM rollout backend agrees with the HF one and with the trainer (needs vLLM; skipped without it).

One engine serves every test (starting one costs ~15 s on 2 CPU cores). Each test first
pushes the weights it needs with `sync_weights`, so the tests do not depend on their order.

The same tests run on a GPU (TEST_DEVICE=cuda, the default where CUDA is available): there
trainer and engine run in bf16 and the tolerances come from `logprob_atol`.
"""

import copy
import os
import re
import subprocess
import sys
import types
import weakref

import pytest
import torch

pytest.importorskip("vllm")

import vllm
from common.logprobs import completion_logprobs
from common.models import build_char_tokenizer, build_tiny_model, eos_token_ids
from common.environment import ToolEnvironment, calc, encode_tool_demonstrations, rollout_with_tools
from common.rollout import HFEngine, generate_hf
from common.tasks import encode_demonstrations, format_prompt
from common.vllm_engine import VLLMEngine

QUESTIONS = ["12+34", "7+5", "99+99", "123+4", "50+50", "1+1", "31+18", "8+80"]  # mixed lengths: left padding
DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16  # trainer and engine; bf16 = the GPU default
EXACT = DEVICE.type == "cpu" and DTYPE == torch.float32  # same fp32 math in both backends: greedy paths agree


def logprob_atol(dtype: torch.dtype, device: torch.device) -> float:
    """How far vLLM's and the trainer's logprobs of the same tokens may differ at the same weights.

    CPU fp32: the same fp32 math on both sides, observed differences ~1e-6. CUDA fp32: other
    kernels (flash attention, TF32 matmuls). bf16 keeps 8 mantissa bits, so logits differ in
    the 3rd digit. The GPU values are bounds from precision, not yet measured here:
    benchmarks/vllm_gpu_check.py prints the observed gap.
    """
    if dtype == torch.float32:
        return 1e-4 if device.type == "cpu" else 2e-3
    return {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]


TOL = logprob_atol(DTYPE, DEVICE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(engine, tokenizer, random-init model, prompts); the engine starts from the random model."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).to(DEVICE, DTYPE).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    engine = VLLMEngine(str(path), DTYPE, max_model_len=256, gpu_memory_utilization=0.3, seed=0,
                        eos_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                        tokenizer=tokenizer, device=DEVICE, vllm_dtype=str(DTYPE).removeprefix("torch."),
                        max_num_seqs=64)
    prompts = [format_prompt(tokenizer, q) for q in QUESTIONS]
    return engine, tokenizer, model, prompts


@pytest.fixture(scope="module")
def eos_model(setup):
    """The random model after 30 steps of learning to answer "42" + EOS: it stops, so masks are exercised."""
    _, tokenizer, model, prompts = setup
    model = copy.deepcopy(model).train()
    batch = encode_demonstrations(tokenizer, prompts, ["42"] * len(prompts), tokenizer.eos_token_id, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        logprobs, _ = completion_logprobs(model, *batch)
        loss = -(logprobs * batch[3]).sum() / batch[3].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def trainer_logprobs(model, rollout, temperature):
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                          rollout.completion_mask, temperature)
    return logprobs * rollout.completion_mask  # (B, C), 0 on padding like sampler_logprobs


@pytest.mark.parametrize("which,max_new_tokens", [("random", 12), ("eos", 12), ("eos", 2)])
def test_greedy_matches_hf(setup, eos_model, which, max_new_tokens):
    engine, tokenizer, random_model, prompts = setup
    model = random_model if which == "random" else eos_model
    engine.sync_weights(model)
    hf = generate_hf(model, tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=max_new_tokens,
                     eos_ids=engine.eos_ids)
    vl = engine.generate(prompts, n=2, temperature=0.0, max_new_tokens=max_new_tokens)
    if which == "eos":  # the trained model stops after "42" when it has the budget, and is cut when not
        assert hf.completions == ["42"] * len(hf.completions)
        assert hf.is_eos.all() == (max_new_tokens > 2)
    for field in ("prompt_ids", "prompt_mask", "prompt_index"):
        assert torch.equal(getattr(vl, field), getattr(hf, field)), field
    if EXACT:  # the same fp32 math: identical greedy paths
        for field in ("completion_ids", "completion_mask", "is_eos"):
            assert torch.equal(getattr(vl, field), getattr(hf, field)), field
        assert vl.completions == hf.completions
    # In bf16 a near-tie between the top two tokens can flip the argmax in one backend and not
    # the other, so there most rows (not all) must agree; logprobs are compared where they do.
    same = [completion(vl, i) == completion(hf, i) for i in range(len(prompts) * 2)]
    assert sum(same) >= 0.75 * len(same), f"greedy rows that agree: {sum(same)} of {len(same)}"
    C = min(vl.sampler_logprobs.shape[1], hf.sampler_logprobs.shape[1])
    rows = torch.tensor(same, device=vl.sampler_logprobs.device)
    # greedy logprobs are of the T = 1 distribution in both backends
    assert torch.allclose(vl.sampler_logprobs[rows, :C], hf.sampler_logprobs[rows, :C], atol=TOL)


def completion(rollout, i: int) -> list[int]:
    """Row i's completion token ids (EOS included, padding dropped)."""
    return rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("which", ["random", "eos"])
def test_sampler_logprobs_match_trainer(setup, eos_model, which, temperature):
    engine, _, random_model, prompts = setup
    model = random_model if which == "random" else eos_model
    engine.sync_weights(model)
    rollout = engine.generate(prompts, n=4, temperature=temperature, max_new_tokens=10)
    diff = (rollout.sampler_logprobs - trainer_logprobs(model, rollout, temperature)).abs()  # (B, C)
    assert diff.max() < TOL, f"max |vLLM - trainer| = {diff.max():.2e}"


def test_weight_sync_is_real(setup):
    engine, tokenizer, random_model, prompts = setup
    model = copy.deepcopy(random_model)
    engine.sync_weights(model)
    # one optimizer step on the trainer's copy only
    batch = encode_demonstrations(tokenizer, prompts, ["42"] * len(prompts), tokenizer.eos_token_id, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logprobs, _ = completion_logprobs(model.train(), *batch)
    (-(logprobs * batch[3]).sum()).backward()
    optimizer.step()
    model.eval()

    # the engine still samples from the old weights: its logprobs are not the trainer's
    stale = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=10)
    before = (stale.sampler_logprobs - trainer_logprobs(model, stale, 1.0)).abs().max()
    engine.sync_weights(model)
    fresh = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=10)
    after = (fresh.sampler_logprobs - trainer_logprobs(model, fresh, 1.0)).abs().max()
    assert before > 5 * TOL, f"before sync: {before:.2e}"
    assert after < TOL, f"after sync: {after:.2e}"


def test_sync_casts_to_engine_dtype(setup):
    """bf16 trainer weights into the engine (fp32 on CPU): the engine then holds exactly the bf16 values."""
    engine, _, random_model, prompts = setup
    model_bf16 = copy.deepcopy(random_model).to(torch.bfloat16)
    engine.sync_weights(model_bf16)
    rollout = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=8)
    reference = model_bf16.to(engine.dtype)  # bf16 values, engine-dtype compute, as in the engine
    assert (rollout.sampler_logprobs - trainer_logprobs(reference, rollout, 1.0)).abs().max() < TOL


def test_rollout_layout(setup, eos_model):
    engine, tokenizer, _, prompts = setup
    engine.sync_weights(eos_model)
    n, pad = 3, tokenizer.pad_token_id
    rollout = engine.generate(prompts, n=n, temperature=1.0, max_new_tokens=6)
    B, C = rollout.completion_ids.shape
    assert B == len(prompts) * n and C <= 6
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape and rollout.prompt_ids.shape[0] == B
    assert rollout.sampler_logprobs.shape == rollout.completion_mask.shape == (B, C)
    assert rollout.is_eos.shape == rollout.prompt_index.shape == (B,) and len(rollout.completions) == B
    # rows i*n .. i*n+n-1 are prompt i
    assert rollout.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(n)]
    for i, prompt in enumerate(prompts):
        row = i * n
        ids = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        assert tokenizer.decode(ids) == prompt
        assert (rollout.prompt_ids[row][rollout.prompt_mask[row] == 0] == pad).all()  # left padding
        assert torch.equal(rollout.prompt_ids[row : row + n], rollout.prompt_ids[row].expand(n, -1))
    # completion mask: a prefix of ones, ending at the first EOS; pad id and logprob 0 after it
    eos = torch.tensor(engine.eos_ids)
    for ids, mask, lp, ended, text in zip(rollout.completion_ids, rollout.completion_mask, rollout.sampler_logprobs,
                                          rollout.is_eos, rollout.completions):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        is_eos = torch.isin(ids[:length], eos)
        assert bool(ended) == bool(is_eos[-1]) and not is_eos[:-1].any()
        assert (ids[length:] == pad).all() and (lp[length:] == 0).all() and (lp[:length] < 0).all()
        assert text == tokenizer.decode(ids[:length], skip_special_tokens=True)
    assert rollout.is_eos.any()  # the trained model does stop: the EOS path is covered


@pytest.fixture(scope="module")
def tool_model(setup):
    """The random model after 60 steps of imitating tool calls, "[12+34]{46}46" (observation masked out of the
    loss, as sft.py trains): it closes calls, so the multi-turn loop runs with real observations."""
    _, tokenizer, model, prompts = setup
    model, env = copy.deepcopy(model).train(), ToolEnvironment()
    demos = [f"[{q}]{{{calc(q)}}}{calc(q)}" for q in QUESTIONS]
    *batch, policy_mask = encode_tool_demonstrations(tokenizer, env, prompts, demos, tokenizer.eos_token_id, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        logprobs, _ = completion_logprobs(model, *batch)
        loss = -(logprobs * policy_mask).sum() / policy_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_multiturn_greedy_matches_hf_and_follows_the_sync(setup, eos_model, tool_model):
    """Multi-turn rollouts (common/environment.py): vLLM (prefix cache on, whole context re-submitted each turn) and
    HF generate give the same greedy completions, observations and masks; after a sync to another model and back,
    vLLM follows the weights it was given."""
    engine, tokenizer, _, prompts = setup
    env = ToolEnvironment()
    for model in (tool_model, eos_model, tool_model):
        engine.sync_weights(model)
        hf = rollout_with_tools(HFEngine(model, tokenizer, engine.eos_ids), tokenizer, env, prompts, 2, 0.0, 24)
        vl = rollout_with_tools(engine, tokenizer, env, prompts, 2, 0.0, 24)
        if model is tool_model:  # the loop ran: calls, observations in the context, answers after them
            assert hf.tool_stats["tool_calls"].sum() >= len(prompts) and (hf.policy_mask < hf.completion_mask).any()
        else:  # the "42" model never calls: one turn each
            assert (hf.tool_stats["tool_calls"] == 0).all() and torch.equal(hf.policy_mask, hf.completion_mask)
        if EXACT:
            for field in ("completion_ids", "completion_mask", "policy_mask", "is_eos"):
                assert torch.equal(getattr(vl, field), getattr(hf, field)), field
            assert vl.completions == hf.completions
            assert all(torch.equal(vl.tool_stats[k], hf.tool_stats[k]) for k in hf.tool_stats)
            assert torch.allclose(vl.sampler_logprobs, hf.sampler_logprobs, atol=TOL)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_multiturn_sampler_logprobs_match_trainer_on_policy_tokens(setup, tool_model, temperature):
    engine, tokenizer, _, prompts = setup
    engine.sync_weights(tool_model)
    rollout = rollout_with_tools(engine, tokenizer, ToolEnvironment(), prompts, 4, temperature, 24)
    observation = (rollout.completion_mask - rollout.policy_mask).bool()  # (B, C)
    assert observation.any() and (rollout.sampler_logprobs[observation] == 0).all()
    diff = (rollout.sampler_logprobs - trainer_logprobs(tool_model, rollout, temperature)) * rollout.policy_mask
    assert diff.abs().max() < TOL, f"max |vLLM - trainer| on policy tokens = {diff.abs().max():.2e}"


def test_missing_vllm_exits_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(SystemExit, match="--rollout vllm needs vLLM"):
        VLLMEngine("unused", torch.float32, 64, 0.3, 0, [3], 0, None)


# ---- guards and the weight sync's memory (issue 9) -------------------------------------------

@pytest.mark.parametrize("old", ["0.11.0", "0.15.1", "0.15.2rc1.dev3+gabc"])
def test_old_vllm_exits_with_one_line(monkeypatch, old):
    """Before 0.16 reload_weights takes no weights: the first sync would raise TypeError; refuse at start."""
    monkeypatch.setattr(vllm, "__version__", old)
    with pytest.raises(SystemExit, match=rf"^error: --rollout vllm: vLLM {re.escape(old)} cannot sync weights") as info:
        VLLMEngine("unused", torch.float32, 64, 0.3, 0, [3], 0, None)
    assert "\n" not in str(info.value) and "vllm>=0.16" in str(info.value)


def test_inherited_multiprocessing_is_overridden_and_a_separate_engine_rejected(monkeypatch):
    """An inherited VLLM_ENABLE_V1_MULTIPROCESSING=1 is replaced before vLLM starts; an engine that
    still ends up in another process is refused in one line. A stand-in LLM records what it saw."""
    seen = {}

    class OutOfProcessLLM:  # what LLM(...) looks like when its engine core runs in a child process
        def __init__(self, **kwargs):
            seen["env"] = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
            self.llm_engine = types.SimpleNamespace(engine_core=object())  # not an InprocClient

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setattr(vllm, "LLM", OutOfProcessLLM)
    with pytest.raises(SystemExit, match="^error: --rollout vllm: the vLLM engine started in a separate process"):
        VLLMEngine("unused", torch.float32, 64, 0.3, 0, [3], 0, None)
    assert seen["env"] == "0"


def test_engine_is_in_process(setup):
    from vllm.v1.engine.core_client import InprocClient

    engine = setup[0]
    assert isinstance(engine.llm.llm_engine.engine_core, InprocClient)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def sync_and_measure_casts(engine, model) -> tuple[int, int]:
    """Run one sync; return (most bytes of new tensors the sync held alive at once, bytes of all of them).

    The weights iterator that sync_weights hands to vLLM is wrapped: each tensor it yields is
    tracked by a weak reference, so it counts as alive exactly as long as something (a list in
    sync_weights, or vLLM's per-layer buffer) still holds it. Tensors that share the trainer's
    storage (no cast was needed) cost nothing and are not counted.
    """
    trainer_storage = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    alive, peak, total = [], 0, 0
    real_rpc = engine.llm.collective_rpc

    def watched(weights):
        nonlocal peak, total
        for name, tensor in weights:
            if tensor.untyped_storage().data_ptr() not in trainer_storage:
                alive.append((weakref.ref(tensor), tensor.nbytes))
                total += tensor.nbytes
            peak = max(peak, sum(nbytes for ref, nbytes in alive if ref() is not None))
            yield name, tensor
            del tensor  # the loop must not keep the last one alive itself

    def rpc(method, *args, kwargs=None, **rest):
        kwargs = dict(kwargs, weights_iterator=watched(kwargs["weights_iterator"]))
        return real_rpc(method, *args, kwargs=kwargs, **rest)

    engine.llm.collective_rpc = rpc
    try:
        engine.sync_weights(model)
    finally:
        del engine.llm.collective_rpc  # back to the class's method
    return peak, total


def test_sync_streams_weights_without_a_second_copy(setup, monkeypatch):
    """bf16 trainer into the engine (fp32 on CPU): every weight needs a cast. Streamed, the casts
    alive at once are one layer's; a list (the old sync) holds them all, which this test detects."""
    engine, _, random_model, prompts = setup
    model_bf16 = copy.deepcopy(random_model).to(torch.bfloat16)
    if engine.dtype == torch.bfloat16:  # on a GPU the engine is bf16 already: make the trainer fp32
        model_bf16 = model_bf16.to(torch.float32)
    peak, total = sync_and_measure_casts(engine, model_bf16)
    assert total > 0 and peak < 0.5 * total, f"casts alive at once: {peak} of {total} bytes"

    # the sync is still complete: the engine samples from the synced weights
    rollout = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=8)
    reference = copy.deepcopy(model_bf16).to(engine.dtype)  # Module.to is in place: keep the bf16 model
    assert (rollout.sampler_logprobs - trainer_logprobs(reference, rollout, 1.0)).abs().max() < TOL

    # the measurement can fail: a sync that builds the list of casts first holds all of them
    def list_sync(model):
        weights = [(name, w.detach().to(engine.dtype)) for name, w in model.state_dict().items()]
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    monkeypatch.setattr(engine, "sync_weights", list_sync)
    peak_list, total_list = sync_and_measure_casts(engine, model_bf16)
    assert peak_list > 0.9 * total_list, f"a list held only {peak_list} of {total_list} bytes"


def test_failed_prefix_cache_reset_exits_with_one_line(setup, monkeypatch):
    engine, _, random_model, _ = setup
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: False)
    with pytest.raises(SystemExit, match="^error: --rollout vllm: reset_prefix_cache\\(\\) failed") as info:
        engine.sync_weights(random_model)
    assert "\n" not in str(info.value)


def test_cuda_index_other_than_0_is_rejected():
    """The in-process engine always takes the first visible GPU; the trainer must not be elsewhere."""
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES=1 --device cuda"):
        VLLMEngine("unused", torch.float32, 64, 0.3, 0, [3], 0, None, device="cuda:1")


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """benchmarks/vllm_gpu_check.py (prepared for a GPU) runs end to end on CPU with the tiny model."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(root, "benchmarks", "vllm_gpu_check.py"), "--device", "cpu",
               "--num-prompts", "4", "--n", "2", "--max-new-tokens", "8", "--repeats", "1",
               "--trainer-dtype", "bfloat16", "--vllm-dtype", "float32"]  # bf16 -> fp32: every sync casts
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("reload_weights signature", "logprob gap", "storage moved", "sync memory", "tokens/s",
                 "all checks passed"):
        assert line in result.stdout, line
