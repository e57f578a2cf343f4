"""How weights are multiplied: int8 and int4 layers, GGUF matrices kept as stored, fp32
matmuls split between threads, pocketlm's own C++ kernels, and `prepare` (fuse ->
quantize or re-lay-out -> pack).

Modules: `int8`, `int4`, `gguf` (GGUFLinear) and `gguf_layouts` (the GGUF types repacked
for the kernels), `split`, `cpp` (the C++ kernels, built on first use), `prepare`.
Knows nothing of files, tokenizers, sampling or HTTP.
"""
