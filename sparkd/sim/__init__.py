"""The simulated engine: a test double for vLLM, SGLang and llama.cpp.

No GPU, engine or model weights exist on development and CI machines. `sparkd sim-engine` stands
in for a real OpenAI-compatible engine everywhere sparkd can observe one: load time, resident
memory, page cache, `/health`, crashes, hangs, strict role alternation and speculative decoding.
It is a test double and must never be mistaken for an engine that serves real answers.

- `behaviour`: PURE request validation, reply planning, response and stream building, speed model.
- `loading`: what the test double does while "loading a model" (files, page cache, memory).
- `engine`: the aiohttp server and the `sparkd sim-engine` command.
"""
