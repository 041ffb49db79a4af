"""Real pretrained models the benchmarks can use offline (fetched from a package registry, converted once
to a local safetensors checkpoint). `pissa_fast.models.smollm2` is the first."""
