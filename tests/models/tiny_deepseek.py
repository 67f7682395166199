"""A tiny random-weight DeepSeek-V3-architecture GGUF (`deepseek2`), written by the tests.

Same graph as the real model at toy sizes: multi-head latent attention (MLA, with the q LoRA
path and the split `attn_k_b`/`attn_v_b` tensors), one dense leading layer, then MoE layers
with a shared expert, sigmoid gating with a selection bias, and expert groups. The tokenizer is
a byte-level gpt2 BPE (256 byte tokens, a few merges) plus DeepSeek's special tokens, so the
built-in deepseek-v3 chat template tokenizes into real control tokens. ~1 MB, written in well
under a second; the bytes depend only on `seed`.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

GENERAL_NAME = "Tiny DeepSeek V3"
ARCH = "deepseek2"

NUM_EMBD = 64
NUM_LAYERS = 3
NUM_DENSE_LAYERS = 1
NUM_HEADS = 4
Q_LORA_RANK = 32
KV_LORA_RANK = 32
ROPE_DIM = 8
NOPE_DIM = 16
V_HEAD_DIM = 16
DENSE_FF = 128
EXPERT_FF = 32
NUM_EXPERTS = 8
NUM_EXPERTS_USED = 2
NUM_EXPERT_GROUPS = 4
NUM_EXPERT_GROUPS_USED = 2
CONTEXT_LENGTH = 4096

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CONTROL_TOKENS = (BOS, EOS, "<｜▁pad▁｜>")
"""Never shown as text (llama.cpp renders control tokens as nothing)."""
USER_DEFINED_TOKENS = (
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)
"""Added tokens as in DeepSeek's tokenizer.json: matched whole when parsing special tokens."""
MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġt", "he"))
"""A few merges: gpt2 vocabularies must have some (an empty list is dropped by the writer)."""


def write_tiny_deepseek(path: Path, *, seed: int = 0, general_name: str = GENERAL_NAME) -> Path:
    """Write the model to `path` (parents created) and return `path`; same seed, same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, token_types = _vocabulary()
    writer = gguf.GGUFWriter(path, ARCH)
    _write_metadata(writer, tokens, token_types, general_name)
    rng = np.random.default_rng(seed)
    for name, array in _tensors(rng, len(tokens)):
        # numpy 2 promotes float32 * float64-scalar to float64, which llama.cpp loads but
        # cannot multiply on CPU (segfault in decode): every tensor must leave here as F32.
        if array.dtype != np.float32:
            raise TypeError(f"{name} is {array.dtype}, not float32")
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _vocabulary() -> tuple[list[str], list[gguf.TokenType]]:
    byte_tokens = list(_bytes_to_unicode().values())
    merged = ["".join(pair) for pair in MERGES]
    tokens = [*byte_tokens, *merged, *CONTROL_TOKENS, *USER_DEFINED_TOKENS]
    types = (
        [gguf.TokenType.NORMAL] * (len(byte_tokens) + len(merged))
        + [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS)
        + [gguf.TokenType.USER_DEFINED] * len(USER_DEFINED_TOKENS)
    )
    return tokens, types


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (space is 'Ġ', newline 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(mapping.items()))


def _write_metadata(
    writer: gguf.GGUFWriter,
    tokens: list[str],
    token_types: list[gguf.TokenType],
    general_name: str,
) -> None:
    writer.add_name(general_name)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(NUM_EMBD)
    writer.add_block_count(NUM_LAYERS)
    writer.add_feed_forward_length(DENSE_FF)
    writer.add_leading_dense_block_count(NUM_DENSE_LAYERS)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(1)  # MLA runs as MQA over the compressed latent
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_q_lora_rank(Q_LORA_RANK)
    writer.add_kv_lora_rank(KV_LORA_RANK)
    writer.add_key_length(KV_LORA_RANK + ROPE_DIM)
    writer.add_value_length(KV_LORA_RANK)
    writer.add_key_length_mla(NOPE_DIM + ROPE_DIM)
    writer.add_value_length_mla(V_HEAD_DIM)
    writer.add_rope_dimension_count(ROPE_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_expert_feed_forward_length(EXPERT_FF)
    writer.add_expert_count(NUM_EXPERTS)
    writer.add_expert_used_count(NUM_EXPERTS_USED)
    writer.add_expert_shared_count(1)
    writer.add_expert_group_count(NUM_EXPERT_GROUPS)
    writer.add_expert_group_used_count(NUM_EXPERT_GROUPS_USED)
    writer.add_expert_weights_scale(2.5)
    writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([" ".join(pair) for pair in MERGES])
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_pad_token_id(tokens.index(CONTROL_TOKENS[2]))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _tensors(rng: np.random.Generator, num_vocab: int) -> list[tuple[str, np.ndarray]]:
    """Every tensor as (name, float32 array); numpy shapes are ggml's `ne` reversed."""

    def weight(*shape: int) -> np.ndarray:
        scale = np.float32(1.0 / np.sqrt(shape[-1]))
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    tensors = [
        ("token_embd.weight", weight(num_vocab, NUM_EMBD)),
        ("output_norm.weight", norm(NUM_EMBD)),
        ("output.weight", weight(num_vocab, NUM_EMBD)),
    ]
    for layer in range(NUM_LAYERS):
        blk = f"blk.{layer}"
        tensors += [
            (f"{blk}.attn_norm.weight", norm(NUM_EMBD)),
            (f"{blk}.attn_q_a.weight", weight(Q_LORA_RANK, NUM_EMBD)),
            (f"{blk}.attn_q_a_norm.weight", norm(Q_LORA_RANK)),
            (f"{blk}.attn_q_b.weight", weight(NUM_HEADS * (NOPE_DIM + ROPE_DIM), Q_LORA_RANK)),
            (f"{blk}.attn_kv_a_mqa.weight", weight(KV_LORA_RANK + ROPE_DIM, NUM_EMBD)),
            (f"{blk}.attn_kv_a_norm.weight", norm(KV_LORA_RANK)),
            # The two halves of HF's kv_b_proj, per head: k as (kv_lora -> nope) transposed.
            (f"{blk}.attn_k_b.weight", weight(NUM_HEADS, KV_LORA_RANK, NOPE_DIM)),
            (f"{blk}.attn_v_b.weight", weight(NUM_HEADS, V_HEAD_DIM, KV_LORA_RANK)),
            (f"{blk}.attn_output.weight", weight(NUM_EMBD, NUM_HEADS * V_HEAD_DIM)),
            (f"{blk}.ffn_norm.weight", norm(NUM_EMBD)),
        ]
        if layer < NUM_DENSE_LAYERS:
            tensors += [
                (f"{blk}.ffn_gate.weight", weight(DENSE_FF, NUM_EMBD)),
                (f"{blk}.ffn_up.weight", weight(DENSE_FF, NUM_EMBD)),
                (f"{blk}.ffn_down.weight", weight(NUM_EMBD, DENSE_FF)),
            ]
            continue
        tensors += [
            (f"{blk}.ffn_gate_inp.weight", weight(NUM_EXPERTS, NUM_EMBD)),
            (
                f"{blk}.exp_probs_b.bias",
                (rng.standard_normal(NUM_EXPERTS) * 0.1).astype(np.float32),
            ),
            (f"{blk}.ffn_gate_exps.weight", weight(NUM_EXPERTS, EXPERT_FF, NUM_EMBD)),
            (f"{blk}.ffn_up_exps.weight", weight(NUM_EXPERTS, EXPERT_FF, NUM_EMBD)),
            (f"{blk}.ffn_down_exps.weight", weight(NUM_EXPERTS, NUM_EMBD, EXPERT_FF)),
            (f"{blk}.ffn_gate_shexp.weight", weight(EXPERT_FF, NUM_EMBD)),
            (f"{blk}.ffn_up_shexp.weight", weight(EXPERT_FF, NUM_EMBD)),
            (f"{blk}.ffn_down_shexp.weight", weight(NUM_EMBD, EXPERT_FF)),
        ]
    return tensors
