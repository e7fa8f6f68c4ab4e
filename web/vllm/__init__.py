"""vLLM's tokenizer routes, for clients written for vLLM: /tokenize with vLLM's bodies (beside
TGI's), /detokenize and /tokenizer_info."""
