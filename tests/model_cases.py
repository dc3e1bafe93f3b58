"""The configurations tests/test_model.py checks against transformers: test name -> (test
architecture of tests/helpers.save_random_hf_model, config overrides), each one option or
combination of a family."""

CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "yarn-rope": ("llama", {"rope_parameters": {  # (its attention factor scales cos and sin)
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}}),
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "qwen2-bias": ("qwen2", {"num_key_value_heads": 1}),
    # head_dim set apart from hidden / heads (as Qwen3's 128), q/k/o bias, a per-head q/k norm
    "qwen3-qk-norm": ("qwen3", {"head_dim": 24, "attention_bias": True}),
    "qwen3-window": ("qwen3", {"head_dim": 16, "use_sliding_window": True, "sliding_window": 6,
                              "max_window_layers": 1}),  # layer 1 slides, layer 0 sees everything
    # q/k/v and gate/up fused in the checkpoint, a window over every layer
    "phi3-window": ("phi3", {"sliding_window": 5}),
    # Phi-4-mini's rope over the first 3/4 of each head (12 of 16 dimensions), the rest passing
    "phi3-partial-rope": ("phi3", {"partial_rotary_factor": 0.75}),
    # scaled embeddings, norms of 1 + w, GELU; tied head, one KV head
    "gemma": ("gemma", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    # transformers' Gemma 3 caps its logits and leaves its attention scores as they are, whatever
    # attn_logit_softcapping says
    # Gemma 3's language model inside its multimodal checkpoint (language_model.model.*, a vision tower)
    "gemma3-mm": ("gemma3-mm", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"],
                                "tie_word_embeddings": True}),
    # Mistral's language model inside Mistral 3's multimodal checkpoint (Mistral Small 3.1), a tied
    # head; Qwen2's inside LLaVA's
    "mistral3-mm": ("mistral3-mm", {"sliding_window": 6, "tie_word_embeddings": True}),
    "llava-mm": ("llava-mm", {}),
    # Qwen2.5-VL's language model (its rope over three axes turns text as Qwen2's), a tied head
    "qwen2_5_vl-mm": ("qwen2_5_vl-mm", {"tie_word_embeddings": True}),
    "gemma3-caps": ("gemma3", {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
    # the embeddings, attention scores, layer outputs and logits scaled; biases everywhere
    "granite": ("granite", {"embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                            "logits_scaling": 2.0, "attention_bias": True, "mlp_bias": True}),
    # Gemma's, plus 4 norms a layer, attention scores and logits soft-capped (caps low enough to
    # bite at these weights), layer 0 sliding
    "gemma2": ("gemma2", {"sliding_window": 6, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                          "query_pre_attn_scalar": 24}),
    # Gemma's, plus 4 norms a layer, per-head q/k norms, layer 0 sliding with its own rope, a
    # query scale of another head size than the heads'
    "gemma3": ("gemma3", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"],
                          "query_pre_attn_scalar": 24, "rope_parameters": {
                              "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}}),
    # norms after attention and the MLP and none before them, one q and one k norm over all heads,
    # biases on q/k/v/o
    "olmo2": ("olmo2", {"attention_bias": True}),
    # OLMo 2's layers, layer 0 sliding with a rope of its own
    "olmo3": ("olmo3", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"],
                        "rope_parameters": {
                            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}}),
    # layer 1 without rotary (NoPE), and it slides
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0], "use_sliding_window": True, "sliding_window": 6,
                            "layer_types": ["full_attention", "sliding_attention"], "mlp_bias": True}),
    # OLMo 2's norms, per-head q/k norms, layer 0 sliding and layer 1 (full attention) without rope
    "exaone4": ("exaone4", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]}),
    # biases on q/k/v and the MLP, none on o
    "seed_oss": ("seed_oss", {"attention_bias": True, "attention_out_bias": False, "mlp_bias": True}),
    # Mistral's attention, 4 experts of which the router picks 2 a token, renormalized; a window
    "mixtral": ("mixtral", {"sliding_window": 6}),
    # Qwen3's attention, the experts' weights not renormalized
    "qwen3_moe": ("qwen3_moe", {"norm_topk_prob": False, "num_experts_per_tok": 3}),
    # Llama's layers with q/k norms over all heads, q/k/v clipped (low enough to bite), experts
    "olmoe": ("olmoe", {"clip_qkv": 0.3, "attention_bias": True}),
    # Qwen2's attention (its q/k/v bias as qkv_bias says), the experts plus a gated shared
    # expert; layer 0 slides
    "qwen2_moe": ("qwen2_moe", {"qkv_bias": False, "use_sliding_window": True, "sliding_window": 6,
                                "max_window_layers": 1, "norm_topk_prob": True}),
    # Granite's multipliers, the router's softmax over its top-k logits, experts stacked in the checkpoint
    "granitemoe": ("granitemoe", {"embedding_multiplier": 3.0, "attention_multiplier": 0.2,
                                  "residual_multiplier": 0.5, "logits_scaling": 2.0, "num_experts_per_tok": 3}),
    # GLM: q/k/v bias, gate/up fused in the checkpoint, rope over pairs (2i, 2i + 1) of each
    # head's first half; GLM-4 adds norms after attention and the MLP
    "glm": ("glm", {}),
    "glm4": ("glm4", {"num_key_value_heads": 1}),
    # GLM-4 with rope over whole heads and no biases
    "glm4-full-rope": ("glm4", {"attention_bias": False, "rope_parameters": {
        "rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}}),
    # Cohere: LayerNorms, attention and the MLP on one norm, rope over pairs (2i, 2i + 1), logits
    # scaled; LayerNorms over each query and key head with weights per head, biases on q/k/v/o
    "cohere": ("cohere", {"use_qk_norm": True, "attention_bias": True, "logit_scale": 0.5}),
    "cohere-tied": ("cohere", {"tie_word_embeddings": True}),
    # Cohere 2: layer 0 slides and takes rope, layer 1 sees everything without rope
    "cohere2": ("cohere2", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"],
                            "logit_scale": 0.25}),
    # Llama's layers with rope over neighbouring pairs: Helium (q/k/v and MLP biases), ERNIE 4.5
    # (biases everywhere, a tied head)
    "helium": ("helium", {"attention_bias": True, "mlp_bias": True}),
    "ernie4_5": ("ernie4_5", {"use_bias": True, "tie_word_embeddings": True}),
    # StarCoder2: torch's LayerNorms with biases, an MLP without a gate (c_fc, c_proj), biases
    # everywhere, a window over every layer
    "starcoder2": ("starcoder2", {"sliding_window": 6}),
    "starcoder2-no-bias": ("starcoder2", {"use_bias": False, "tie_word_embeddings": True}),
    # HunYuan: per-head q/k norms after rope, biases on q/k/v/o; its fixed NTK alpha (a "dynamic"
    # rope with alpha: a larger base, static)
    "hunyuan": ("hunyuan", {"attention_bias": True}),
    "hunyuan-ntk-alpha": ("hunyuan", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                                          "alpha": 1000.0, "factor": 1.0}}),
    # Phi (phi-1.5, phi-2): attention and an MLP without a gate (fc1, fc2; gelu_new) on one
    # LayerNorm, summed before the residual; rope over half of each head; biases everywhere, the
    # head's too; with qk_layernorm, one LayerNorm over each query and key head
    "phi": ("phi", {}),
    "phi-qk-norm": ("phi", {"qk_layernorm": True, "num_key_value_heads": 1, "tie_word_embeddings": True,
                            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0,
                                                "partial_rotary_factor": 0.75}}),
    # StableLM: torch's LayerNorms, rope over a quarter of each head; StableLM 2 12B's parallel
    # layers, q/k/v biases and a LayerNorm per query and key head
    "stablelm": ("stablelm", {}),
    "stablelm-parallel": ("stablelm", {"use_parallel_residual": True, "use_qkv_bias": True, "qk_layernorm": True}),
    # Nemotron (Minitron): LayerNorms of weights 1's offset with biases, an MLP without a gate
    # (ReLU²), rope over half of each head; biases on attention and the MLP
    "nemotron": ("nemotron", {"attention_bias": True, "mlp_bias": True}),
    "nemotron-tied": ("nemotron", {"tie_word_embeddings": True, "num_key_value_heads": 1,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 1.0}}),
    # Arcee (AFM): Llama's layers with an MLP without a gate (ReLU²)
    "arcee": ("arcee", {"attention_bias": True, "mlp_bias": True}),
    "arcee-yarn": ("arcee", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                 "original_max_position_embeddings": 64}}),
    # OLMo (1): LayerNorms without weight or bias, q/k/v clipped, biases on attention
    "olmo": ("olmo", {"clip_qkv": 0.3, "attention_bias": True}),
    "olmo-tied": ("olmo", {"tie_word_embeddings": True}),
    # Mistral's layers, a window on layer 1 only
    "ministral": ("ministral", {"sliding_window": 6, "layer_types": ["full_attention", "sliding_attention"]}),
}
