"""longsft: the library behind the entry scripts at the repository root. Its folders follow the pipeline:

    data/       input records -> the on-disk dataset (inputs.py, pretokenize.py, storage.py), packs and the
                sorted-batching order (packing.py, sort_and_group.py), upstream's layout converted (upstream_layout.py)
    templates/  one chat format per template family (base.py, glm.py, llama.py, longalign.py, auto.py +
                auto_records.py), looked up by name through the registry (registry.py, patch/families.py)
    train/      main.py's run: settings (arguments.py, settings.py), data checks (data.py), the model (model.py),
                batches (batches.py), the Trainer (trainer.py), checkpoints, sequence parallelism (run.py ties them)
    tiny/       tiny offline tokenizer and model folders for the tests, benchmarks and the CPU quickstart

plus errors.py (one user-error type and exit status), atomic_dir.py (folders replaced atomically) and models.py (a
model folder's family, tokenizer and model class through patch/families.py). The package never imports a root
module; patch/ (the model and tokenizer files copied into model folders) imports nothing from here. Code that
needs no torch does not import it: pre-tokenization and sort_and_group run without torch.
"""
