"""Training recipes: the code that runs inside a training job's child process.

Contract with the training service
----------------------------------
Job kind entry point: ``services.training.recipes.run:run_training(ctx: JobContext) -> dict`` (the outputs).

``ctx.spec`` is the JSON dict the service builds, every default filled: :class:`.spec.TrainingSpec` (the
one definition of its fields, defaults, bounds and docs; :meth:`.spec.Hyperparameters.resolve` computes the
method-dependent defaults). Its shape::

    {"method": "full|lora|qlora|dora|dpo|orpo|kto|simpo|cpo", "use_lora": bool (preference methods),
     "base_model": {"name": "models/m/versions/v1", "artifact_prefix": "...", "files": [{"path","size","sha256"}]},
     "datasets": [{"name": "datasets/d/versions/v1", "key": "<s3 key>", "sha256": "...",
                   "format": "messages|alpaca|sharegpt|preference|kto", "file_type": "jsonl|json|parquet"}],
     "validation_dataset": {same shape} | null, "validation_split": 0.0,
     "hyperparameters": {every field of spec.Hyperparameters},
     "launcher": {"kind": "local|torchrun|deepspeed", "num_processes", "zero_stage", "offload", "offload_parameters"},
     "log_every_steps", "eval_every_steps", "checkpoint_every_steps" (0 = one checkpoint at the end),
     "output": {"model": "models/<name>", "merge": bool, "description": ""},
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
