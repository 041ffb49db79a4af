"""A real TRL SFTTrainer(peft_config=LoraConfig(init_lora_weights="pissa_niter_4")) with the pissa_fast
backend on: a tiny LLaMA built from a config, a word-level tokenizer and a dataset built in memory."""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_models import count_pissa_fast, logits, lora_layers, tiny  # noqa: E402

import pissa_fast.peft  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "rug", "ran", "to", "red", "big", "small", "and"]
pytestmark = pytest.mark.filterwarnings("ignore")


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def sentences(n=32):
    gen = torch.Generator().manual_seed(0)
    pick = lambda ws: ws[int(torch.randint(len(ws), (1,), generator=gen))]  # noqa: E731
    return [f"the {pick(['big', 'small', 'red'])} {pick(['cat', 'dog'])} sat on the {pick(['mat', 'rug'])}"
            for _ in range(n)]


def test_sft_trainer_with_the_backend(monkeypatch, tmp_path):
    torch.set_num_threads(1)
    tokenizer = word_tokenizer()
    model = tiny("llama")  # vocab 128 >= the tokenizer's 18 words
    x = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    ref = logits(model, x)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="pissa_niter_4",
                             task_type="CAUSAL_LM")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=2e-2,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, max_length=16, seed=0)
    with pissa_fast.peft.enabled(), count_pissa_fast(monkeypatch) as count:
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": sentences()}),
                                 processing_class=tokenizer, peft_config=config)
        n_layers = len(lora_layers(trainer.model))
        assert n_layers == 14  # all-linear leaves lm_head out
        assert count.weights == n_layers and 0 < count.calls < n_layers  # pissa_fast did it, batched
        was = trainer.model.training
        trainer.model.eval()
        torch.testing.assert_close(logits(trainer.model, x), ref, rtol=0, atol=1e-4)  # PiSSA keeps the model
        trainer.model.train(was)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # 4.95 -> 4.05 when written
