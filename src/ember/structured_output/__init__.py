"""Structured output: grammars compiled by xgrammar, one matcher per sequence, token bitmasks for the sampler."""
