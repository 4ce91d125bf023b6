"""Bayesian LoRA on a tiny causal LM with peft, and its calibration: ECE of the posterior mean vs the posterior
predictive over K weight samples, on a synthetic 4-way task with 20 % label noise (run: python this_file.py)."""

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import bayeslayers

torch.manual_seed(0)
config = LlamaConfig(vocab_size=24, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
bayeslayers.convert(model, preset="causal-lm-bnn-peft", init_sigma=0.05, prior_sigma=0.2)  # sigma on LoRA A


def task(n, seed):  # 3 digit tokens (0..15) -> answer token 16 + x2 % 4, a random answer 20 % of the time
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (n, 3), generator=g)
    y = torch.where(torch.rand(n, generator=g) < 0.2, torch.randint(0, 4, (n,), generator=g), x[:, 2] % 4)
    return x, y


def answer_logits(x):  # the next-token logits over the 4 answer tokens
    return model(input_ids=x).logits[:, -1, 16:20]


def ece(probs, y, bins=10):  # expected calibration error: |accuracy - confidence| averaged over confidence bins
    confidence, guess = probs.max(-1)
    edges = torch.linspace(0, 1, bins + 1)
    return sum(
        ((guess[m] == y[m]).float().mean() - confidence[m].mean()).abs() * m.float().mean()
        for m in ((confidence > lo) & (confidence <= hi) for lo, hi in zip(edges[:-1], edges[1:]))
        if m.any()
    ).item()


(x_train, y_train), (x_test, y_test) = task(128, seed=1), task(2048, seed=2)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
for _ in range(300):
    model.train()
    batch = torch.randint(0, len(x_train), (64,))
    loss = F.cross_entropy(answer_logits(x_train[batch]), y_train[batch])
    loss = loss + bayeslayers.kl_loss(model) / len(x_train)  # the ELBO per training example
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

with torch.no_grad():
    model.eval()  # eval: the posterior mean (what peft / diffusers save)
    mean = answer_logits(x_test).softmax(-1)
    samples = []
    for k in range(16):  # the posterior predictive: average the softmax over K = 16 weight samples
        with bayeslayers.sampling(model, seed=k):
            samples.append(answer_logits(x_test).softmax(-1))
    predictive = torch.stack(samples).mean(0)
for name, probs in (("posterior mean", mean), ("posterior predictive (K=16)", predictive)):
    accuracy, confidence = (probs.argmax(-1) == y_test).float().mean(), probs.max(-1)[0].mean()
    nll = F.nll_loss(probs.log(), y_test)
    print(
        f"{name:28s} accuracy {accuracy:.3f}  confidence {confidence:.3f}  ECE {ece(probs, y_test):.3f}  NLL {nll:.3f}"
    )
