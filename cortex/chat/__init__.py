"""Everything between chat messages and token ids: tokenizers, chat templates, detokenization."""
