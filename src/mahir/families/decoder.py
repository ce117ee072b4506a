"""The place for decoder LLMs (the next family to come), and why it is not a `Family` like the
others.

An encoder, an image classifier or a tensor model answers in one forward pass, so a `Session`
(named arrays in, named arrays out) and the `Family` contract in `families/__init__.py` cover
them. A decoder answers by generating: a prefill over the prompt fills a KV cache, then one
decode step per new token reads all of it, greedy or sampled, until a stop token or a length.
So its family will own:

- prompt workloads: a prompt-length distribution and output lengths (and the user's prompt
  files), tokenized with the model's chat template;
- a `Generator` beside `Session` (`prefill`, `decode`, a KV cache it owns), which engines
  implement (PyTorch, OpenVINO GenAI, llama.cpp, vLLM), each timed per phase: time to first
  token and time per output token, not one latency;
- fidelity for generation against the fp32 reference on held-out text: teacher-forced next-token
  top-1 agreement, mean KL divergence, perplexity, and greedy-continuation agreement;
- its serving codec: OpenAI chat/completions with streaming over continuous batching.

Loading stays in `model.py` (a decoder folder, or a .gguf file): it will build this family as it
builds the others, and everything that differs by kind of model lands here.
"""
