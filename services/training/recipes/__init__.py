"""Training recipes: the code that runs inside a training job's child process.

Contract with the training service
----------------------------------
Job kind entry point: ``services.training.recipes.run:run_training(ctx: JobContext) -> dict`` (the outputs).

``ctx.spec`` is the JSON dict the service builds, every default filled (typed in :mod:`.spec`)::

    {"method": "full|lora|qlora|dora|dpo|orpo|kto|simpo|cpo", "use_lora": bool (preference methods),
     "base_model": {"name": "models/m/versions/v1", "artifact_prefix": "...", "files": [{"path","size","sha256"}]},
     "datasets": [{"name": "datasets/d/versions/v1", "key": "<s3 key>", "sha256": "...",
                   "format": "messages|alpaca|sharegpt|preference|kto", "file_type": "jsonl|json|parquet"}],
     "validation_dataset": {same shape} | null, "validation_split": 0.0,
     "hyperparameters": {"learning_rate": 1e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.05, "num_epochs": 1,
         "max_steps": -1, "batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 2048, "seed": 42,
         "packing": false, "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": "all-linear",
         "beta": 0.1, "precision": "fp32|bf16|fp16", "weight_decay": 0.0, "max_grad_norm": 1.0},
     "launcher": {"kind": "local|torchrun|deepspeed", "num_processes": 1, "zero_stage": 2, "offload": false},
     "log_every_steps": 1, "eval_every_steps": 0, "checkpoint_every_steps": 0 (0 = one checkpoint at the end),
     "output": {"model": "models/<name>", "merge": false, "description": ""},
     "s3": {"endpoint": "...", "bucket": "...", "secure": false}, "registry_addr": "127.0.0.1:50051" ("" = skip),
     "omp_num_threads": 1}

S3 credentials come from the child's environment, ``YARD_JOB_S3_ACCESS_KEY`` / ``YARD_JOB_S3_SECRET_KEY``
(``Worker(child_env=...)``), read only by :class:`.settings.JobSecrets`.

S3 layout (job-id = ``ctx.name.split("/")[-1]``): checkpoints ``training/{job-id}/checkpoints/step-{N:08d}``
(manifest written last; ``ctx.save_resume_state({"checkpoint_prefix", "step"})`` after each), outputs
``training/{job-id}/outputs/adapter`` (PEFT runs), ``.../outputs/model`` (full fine-tune),
``.../outputs/merged`` (``output.merge``).

Registration: ``RegistryService.RegisterDerivedVersion`` at ``spec["registry_addr"]`` under ``output.model``:
the adapter as ADAPTER (lineage base = the base model version), the merged model as MERGED (lineage base =
the adapter version), a full fine-tune as MERGED (lineage base = the base model version); lineage carries the
dataset versions, ``job = ctx.name`` and ``parameters = {method, use_lora, hyperparameters, final_metrics}``.

Outputs: ``{"adapter_version": name | None, "merged_version": name | None (a full fine-tune's model is here),
"final_metrics": {...}, "checkpoints": [{"prefix", "step"}], "adapter_prefix" / "merged_prefix": S3 prefix}``.

Errors: a bad spec is InvalidArgument (``spec.<field>``); qlora without CUDA + bitsandbytes, fp16 without CUDA
are FailedPrecondition(reason HARDWARE_UNSUPPORTED) before anything is loaded; a cancelled job raises Cancelled
and keeps its checkpoints (they are in the outputs); a resumed attempt (``ctx.resume``) continues from the
newest complete checkpoint in S3 with the same step, LR schedule, RNG and data position.

``merge.merge_adapter(base_dir, adapter_dir, out_dir)`` is also what the service's MergeAdapter RPC uses.
"""
