"""Speculative decoding: proposers guess a request's next tokens, one target pass verifies them."""
