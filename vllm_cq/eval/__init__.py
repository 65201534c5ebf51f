"""Quality evaluation through vLLM (`vllm-cq eval`): perplexity and passkey retrieval per KV format.

`ppl` (windows and perplexity from prompt logprobs), `passkey` (exact-length prompts, greedy scoring),
`runner` (one engine per format, each in its own process), `report` (table, JSON, plot). Importing
this package does not import vLLM.
"""
