"""Dialects: one object per (client dialect × upstream dialect) that does an attempt's request, answer,
stream, errors and usage. `proxy.endpoints` names, per endpoint, the dialect for each upstream; the relay
picks it once per attempt (`Endpoint.dialect_for`).

- `base`: the shared shape and the pass-through rewrite;
- `chat`: OpenAI Chat Completions clients (pass-through; Anthropic providers by translation);
- `legacy`: OpenAI completions and embeddings (pass-through only);
- `messages`: Anthropic Messages clients (pass-through; OpenAI providers by translation; count_tokens);
- `responses`: OpenAI Responses clients (pass-through to providers that serve it; Chat Completions and
  Anthropic providers by translation).
"""
