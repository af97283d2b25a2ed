"""The gateway: one OpenAI-compatible endpoint in front of sparkd's engines.

- `rewrite`: PURE role policies (passthrough, merge, strict, strict-tools, auto).
- `classify`: PURE workload classifier (structured, vision, code, chat).
- `dispatch`: PURE choice of engine variant (plain, speculative), static or measured.
- `routing`: PURE view of the daemon's status and what to do with a request (serve, hold,
  swap on demand, refuse), idle unloads, the /v1/models listing.
- `limits`: PURE checks of a request body's shape and its caps (messages, parts).
- `prepare`: PURE one body made ready for an engine (parse, check, classify, rewrite).
- `worker`: the process that prepares large bodies off the event loop.
- `routes`: PURE allow-list of routes, request targets normalized to them.
- `media`: PURE finder of media an engine would fetch, anywhere in a body.
- `auth`: API keys (digests, per-key models and rate limits), Host and Origin checks; pure
  but for reading the keys file.
- `errors`, `metrics`: OpenAI-style error bodies; Prometheus metrics.
- `app`: the aiohttp adapter (relay, holding, the handlers); `door`: who is let in, body
  reading within bounds, the connection guard (timeouts, limits); `daemon_link`: the
  daemon's event stream and idle unloads; `state`: typed app state and settings; `command`:
  `sparkd gateway`; `keys_command`: `sparkd gateway-key`.
"""
