"""Tiny random models and an offline-built tokenizer for fast tests (no network, no weights)."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "State the final answer to the following arithmetic problem: 12 + 7 - 3 =",
    "Let's think step by step. First 12 + 7 = 19. Then 19 - 3 = 16. Therefore, the answer is 16.",
    "Calculate the sum of the numbers. How many legs are there in total? The answer is 42.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus minus times equals",
] * 20


def build_tokenizer(folder: Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer (``vocab_size`` tokens, at most) with ChatML specials, saved to
    ``folder``; another size gives other merges, hence another tokenizer of the same text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_model(
    folder: Path,
    arch: str = "llama",
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    vocab_size: int = 400,
    **config_kwargs,
) -> Path:
    """A tiny random causal LM (llama, qwen2, qwen3 or mistral shaped) with the test tokenizer, saved
    to ``folder``; ``config_kwargs`` override config fields (e.g. ``rope_scaling``); ``vocab_size``
    sizes the tokenizer (another one than the default gives a student that tokenizes differently)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    tok = build_tokenizer(folder, vocab_size)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    config = cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    return folder


def train_tiny_teacher(folder: Path, problems: list[dict], epochs: float = 30, seed: int = 0) -> Path:
    """Fit a tiny model on worked answers to ``problems`` so it answers (most of) them correctly.

    A real model with real weights that knows the task: it lets tests exercise the correct-only
    filter, answer extraction and teacher accuracy without pretrained weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import StudentConfig
    from distill.students.data import render_prompt, tokenize_example
    from distill.students.trainer import train

    torch.set_num_threads(1)
    build_model(folder, "qwen2", seed=seed, layers=2, hidden=96)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    trigger = "Let's think step by step."
    template = tok.apply_chat_template(
        [{"role": "user", "content": "<<Q>>"}], add_generation_prompt=True, tokenize=False
    )
    examples = [
        tokenize_example(
            tok,
            render_prompt(template.replace("<<Q>>", "<<<DISTILL_QUESTION>>>"), p["question"]) + trigger,
            f" So the answer is {p['gold']}.",
            256,
        )
        for p in problems
    ]
    cfg = StudentConfig(
        model="unused", epochs=epochs, lr=2e-3, batch_size=2, micro_batch_size=2, warmup_ratio=0.05, seed=seed
    )
    train(model, examples, cfg, tok.pad_token_id)
    model.save_pretrained(folder)
    return folder


def write_recipe(root: Path, name: str, task_cfg, teacher: dict, student: dict, **sections) -> Path:
    """``root/recipe.yaml`` for a tiny run: outputs and completion cache under ``root``, the tiny task,
    and the teacher/student (and any other) sections as given; returns its path."""
    import yaml

    recipe = {
        "name": name,
        "output_dir": str(root / "runs"),
        "cache": str(root / "cache.sqlite"),
        "task": task_cfg.model_dump(),
        "teacher": teacher,
        "student": student,
        **sections,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def export_bundle(model, tokenizer, out: Path, max_new_tokens: int = 16, attention: str = "auto", **bundle) -> str:
    """``model`` exported to ``out/model.onnx`` with the bundle files beside it (the padding side its
    attention layout needs; ``bundle``: more ``write_bundle_files`` options); returns the layout."""
    from distill.export.bundle import FP32_FILE, write_bundle_files
    from distill.export.onnx_export import PADDING_SIDE, export_decoder

    layout = export_decoder(model, out / FP32_FILE, attention=attention)
    write_bundle_files(
        tokenizer, model.config, out, max_new_tokens, FP32_FILE, padding_side=PADDING_SIDE[layout], **bundle
    )
    return layout
