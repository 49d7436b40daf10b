"""The explained-variance ceiling of ppo.py's critic on the default task, and a linear probe of the starting trunk.

A perfect critic knows V*(s_t) = P(correct | prompt, y_<t) under the policy. On 2-digit addition it is exact by
teacher forcing: V*_t = prod_{k >= t} pi(answer_k | prompt, answer_<k) (EOS included) if y_<t is a prefix of the
right answer, else 0. Its explained variance of the Monte-Carlo return R (beta = 0) over all completion tokens is
the most any critic can reach at that policy. The probe then asks whether R is linearly readable from the
policy trunk's final hidden state at the state before EOS (where the answer is complete): ridge regression on
12 batches, R^2 on 12 others. Both on 128-completion batches (16 prompts x G = 8, T = 1) as in ppo.py.

    python benchmarks/ppo_ev_ceiling.py runs/sft          # the starting policy
    python benchmarks/ppo_ev_ceiling.py runs/ppo          # after ppo.py
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.logprobs import masked_var, position_ids_from_mask  # noqa: E402
from common.models import eos_token_ids, load_model_and_tokenizer  # noqa: E402
from common.rollout import HFEngine, generate_and_score  # noqa: E402
from common.tasks import format_prompt, load_task, rows_at  # noqa: E402


def main(path: str, batches: int = 24):
    torch.set_num_threads(1)
    task = load_task("add_noisy")
    model, tok = load_model_and_tokenizer(path, "cpu", torch.float32)
    model.eval()
    eos = eos_token_ids(model, tok)
    engine = HFEngine(model, tok, eos)  # HF generate, as ppo.py with --rollout hf
    evs, accs, feats, targets = [], [], [], []
    for b in range(batches):
        position = 10_000 + 16 * b  # prompts ppo.py's first 600 steps never reach
        r = generate_and_score(engine, tok, task, position, 16, 1, 8, 1.0, task.max_new_tokens)
        rows = task.prompts[rows_at(len(task.prompts), position, 16, 1)]
        mask = r.completion_mask.float()  # (B, C)
        vstar = torch.zeros_like(mask)
        with torch.no_grad():
            for i in range(len(r)):
                row = r.prompt_index[i].item()
                p_ids = tok(format_prompt(tok, rows["question"][row], task.system_prompt),
                            add_special_tokens=False)["input_ids"]
                a_ids = tok(rows["answer"][row], add_special_tokens=False)["input_ids"] + [eos[0]]
                logp = model(torch.tensor([p_ids + a_ids])).logits[0].log_softmax(-1)
                logp_answer = torch.stack([logp[len(p_ids) - 1 + k, a] for k, a in enumerate(a_ids)])
                y = r.completion_ids[i].tolist()
                for t in range(int(mask[i].sum())):
                    if y[:t] == a_ids[:t]:
                        vstar[i, t] = logp_answer[t:].sum().exp()
            ids = torch.cat([r.prompt_ids, r.completion_ids], 1)[:, :-1]
            am = torch.cat([r.prompt_mask, r.completion_mask], 1)[:, :-1]
            hidden = model.base_model(input_ids=ids, attention_mask=am,
                                      position_ids=position_ids_from_mask(am)).last_hidden_state
        R = r.rewards.float()[:, None].expand_as(mask)
        evs.append((1 - masked_var(R - vstar, mask) / masked_var(R, mask)).item())
        accs.append(r.rewards.float().mean().item())
        last = mask.sum(-1).long() - 1
        feats.append(hidden[torch.arange(len(r)), r.prompt_ids.shape[1] - 1 + last])
        targets.append(r.rewards.float())
    half = batches // 2
    X, Y = torch.cat(feats), torch.cat(targets)
    X = torch.cat([X, torch.ones(len(X), 1)], 1)
    n = half * 128
    w = torch.linalg.solve(X[:n].T @ X[:n] + 1e-2 * torch.eye(X.shape[1]), X[:n].T @ Y[:n])
    r2 = lambda a, b: (1 - (Y[a:b] - X[a:b] @ w).var() / Y[a:b].var()).item()  # noqa: E731
    print(f"{path}: sampled accuracy {sum(accs) / batches:.3f}; perfect-critic explained variance "
          f"{sum(evs) / batches:.3f} (batch min {min(evs):.3f}, max {max(evs):.3f})")
    print(f"linear probe of R at the state before EOS: R^2 {r2(0, n):.3f} on its {n} training rows, "
          f"{r2(n, len(Y)):.3f} held out")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sft")
