"""A tiny llama-architecture GGUF with random weights, for running the real `llama-server`.

A few hundred KB, written in well under a second with the `gguf` package (llama.cpp's own
writer, PyPI `gguf`): 2 layers, a 64-wide embedding, an SPM ("llama") vocabulary of 235
tokens and a chat template in `tokenizer.chat_template`. The weights are random (a fixed seed,
so every file is byte-identical) and the text it writes is gibberish, but llama-server loads,
tokenizes, applies the template, decodes and streams it as it does a real model.

Two rules keep the server's answers valid:
- Every token decodes to ASCII. The byte-fallback tokens stop at <0x7F>: a random model
  emitting half of a UTF-8 sequence makes llama-server answer 500 (invalid UTF-8 in JSON).
- The end-of-generation token's output row is zero while every other row is large, so its
  logit (0) is far below the maximum: replies run to `max_tokens` instead of ending at once.

Templates (`TEMPLATES`): `permissive` renders any roles in any order; `strict` is
Mistral-7B-Instruct-v0.1's template (tokenizer_config.json, as published), which raises
"Conversation roles must alternate user/assistant/user/assistant/..." and "Only user and
assistant roles are supported!".

Also a command: `python tests/integration/tiny_gguf.py OUT.gguf [--template strict]`.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path
from typing import Final

import gguf
import numpy as np

# Mistral-7B-Instruct-v0.1's chat_template (tokenizer_config.json), as published (the same text
# as tests/unit/test_rewrite.py's MISTRAL_V01_TEMPLATE).
STRICT_TEMPLATE: Final = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
# Any roles, any order (ChatML-like framing).
PERMISSIVE_TEMPLATE: Final = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEMPLATES: Final[dict[str, str]] = {"permissive": PERMISSIVE_TEMPLATE, "strict": STRICT_TEMPLATE}

N_EMBD: Final = 64
N_LAYER: Final = 2
N_HEAD: Final = 4
N_HEAD_KV: Final = 2
N_FF: Final = 128
CONTEXT_LENGTH: Final = 2048
SEED: Final = 20261203

UNK, BOS, EOS = 0, 1, 2
# SentencePiece's word-boundary marker: a token "\u2581the" is " the".
SPACE: Final = "\u2581"
WORDS: Final = ("the", "model", "engine", "sparkd", "llama", "server", "hello", "test", "ok")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types (gguf.TokenType): control tokens, byte fallback for
    0x00-0x7F only, every printable ASCII character, and a few whole words."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(0x80):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
    for char in string.ascii_letters + string.digits + string.punctuation:
        tokens.append(char)
        types.append(gguf.TokenType.NORMAL)
    tokens.append(SPACE)
    types.append(gguf.TokenType.NORMAL)
    for word in WORDS:
        tokens.append(SPACE + word)
        types.append(gguf.TokenType.NORMAL)
    # SPM merges by score: longer pieces score higher, so whole words win over letters.
    scores = [0.0 if t != gguf.TokenType.NORMAL else float(len(tok)) for tok, t in
              zip(tokens, types, strict=True)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: Path, *, template: str = "permissive", name: str = "tiny") -> Path:
    """Write the model to `path` (its directory must exist) with the chat template
    `TEMPLATES[template]`; returns `path`."""
    if template not in TEMPLATES:
        raise ValueError(f"template: expected one of {sorted(TEMPLATES)}, got {template!r}")
    rng = np.random.default_rng(SEED)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    n_embd_kv = head_dim * N_HEAD_KV

    def weight(rows: int, cols: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)  # noqa: FBT003 (the templates write bos_token)
    writer.add_chat_template(TEMPLATES[template])

    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD, 1.0))
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{blk}.attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(n_embd_kv, N_EMBD))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(n_embd_kv, N_EMBD))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    # Large logits for every token but the control ones, whose rows are zero: the model never
    # picks </s> (or <s>, <unk>) and so writes exactly max_tokens tokens.
    output = weight(n_vocab, N_EMBD, 3.0)
    output[[UNK, BOS, EOS]] = 0.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="permissive")
    args = parser.parse_args()
    print(write_tiny_gguf(args.out, template=args.template))


if __name__ == "__main__":
    main()
