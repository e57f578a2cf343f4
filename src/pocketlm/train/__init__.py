"""Fine-tuning: full and LoRA, resumable, exported in Hugging Face layout.

`finetune.finetune(FinetuneJob(...))` is the entry point (the CLI's `pocketlm finetune`);
`data` reads and packs text, `lora` wraps Linear layers, `trainer` runs the loop,
`checkpoint` and `metrics` write the run folder, `export` writes the model store entry,
`distributed` is torchrun's DDP / FSDP.
"""
