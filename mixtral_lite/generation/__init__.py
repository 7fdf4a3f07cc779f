"""Generation: the prefill/decode loop, sampling, the tokenizer and the streaming detokeniser."""
