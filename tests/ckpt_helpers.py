"""Tiny transformers checkpoints built from configs and saved locally (no hub), and the helpers the
checkpoint/CLI tests share."""
import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PISSA_FAST_PROGRESS", "0")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cli(argv):
    """The real `pissa-fast` entry point, in process."""
    from pissa_fast.cli import main

    return main([str(a) for a in argv])


def make_llama(path, dtype=torch.float32, shard="100KB", seed=0, tie=False):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(path, max_shard_size=shard)
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (Path(path) / "tokenizer.json").write_text("{}")
    return model


def make_gpt2(path, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


def tokens(seed=1, vocab=128, shape=(2, 8)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits.float()


def load_pissa(out, auto="AutoModelForCausalLM", **kw):
    """The residual at OUT with the adapter at OUT/pissa_init, as the ecosystem loads them."""
    import transformers
    from peft import PeftModel

    base = getattr(transformers, auto).from_pretrained(out, **kw).eval()
    return PeftModel.from_pretrained(base, out, subfolder="pissa_init").eval()


def tree_digest(path):
    """Names, sizes, mtimes and contents of every file under path."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def train_adapter(pm, seed=3, scale=0.05):
    """Move every LoRA weight a little, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=gen) * p.abs().mean())
