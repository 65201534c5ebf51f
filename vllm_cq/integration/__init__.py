"""vLLM integration: `compat` (the only module touching vLLM internals), `config` (validation and
codebook resolution before memory is allocated), `backend` (the attention backend over codes)."""
