"""Convert presets for diffusers models (registered with the core through the ``bayeslayers.presets``
entry-point group declared in setup.py).

``dreambooth-bnn``: the seed paper's choice for full fine-tuning. Inside the down, mid and up blocks of a
UNet2DConditionModel, the self-attention projections ``attn1.to_q/to_k/to_v/to_out.0`` and the feed-forward
``ff.net.0.proj`` / ``ff.net.2`` become Bayesian (96 Linear layers, 23 % of SD1.5's UNet weights). Convs,
cross-attention ``attn2``, time embeddings and norms stay deterministic (and trainable).

``dreambooth-bnn-lora``: the seed paper's LoRA variant: rank-4 LoRA on every attention projection (attn1 and
attn2) in the blocks, only the LoRA up factor (B) Bayesian.

``dreambooth-bnn-peft``: the same LoRA variant on a UNet whose LoRA peft added (diffusers' ``unet.add_adapter(
LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"]))``): the adapter's B factors in the blocks'
attention projections become Bayesian in place, with the zero-mean prior N(0, prior_sigma^2).

``causal-lm-bnn-peft``: a transformers causal LM (Llama / Mistral / Qwen / Gemma layout) under ``get_peft_model``:
the adapter's A factors on the attention ``q_proj/k_proj/v_proj/o_proj`` and the MLP ``gate_proj/up_proj/down_proj``
become Bayesian (sigma on A only, as BLoB), the prior centred on A's value at conversion.

``clip-text-bnn``: for transformers' CLIPTextModel (Stable Diffusion's text encoder) under
``--train_text_encoder --bayes_text_encoder``: in every encoder layer the self-attention projections
``self_attn.q_proj/k_proj/v_proj/out_proj`` and the MLP ``mlp.fc1`` / ``mlp.fc2`` become Bayesian (72 Linear
layers in SD1.5's 12-layer encoder); embeddings, layer norms and the final norm stay deterministic (and trainable).
"""

from bayeslayers.config import BayesConfig

_BLOCKS = r".*(?:down_blocks|mid_block|up_blocks)\..*"

DREAMBOOTH_BNN = BayesConfig(
    target_modules=_BLOCKS + r"(?:attn1\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))",
    mode="full",
)

DREAMBOOTH_BNN_LORA = BayesConfig(
    target_modules=_BLOCKS + r"attn[12]\.(?:to_q|to_k|to_v|to_out\.0)",
    mode="lora",
    rank=4,
    bayesian_factors="B",
)

CLIP_TEXT_BNN = BayesConfig(
    target_modules=r".*encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])",
    mode="full",
)

DREAMBOOTH_BNN_PEFT = BayesConfig(
    target_modules=_BLOCKS + r"attn[12]\.(?:to_q|to_k|to_v|to_out\.0)",
    mode="peft",
    bayesian_factors="B",
    factor_prior="zero",
)

CAUSAL_LM_BNN_PEFT = BayesConfig(
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    mode="peft",
    bayesian_factors="A",
    factor_prior="current",
)
