"""Sampling: parameters and token choice, the decode batch (KV cache rows join and leave), and
the shared continuous-batching loop every sampling request joins."""
