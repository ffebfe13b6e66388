"""Defaults shared by every restoration config: the authors' recipe (arXiv 2604.00004 and their code,
github.com/gracefulning/LinearARD at 23866f6: train.py, data_loader.py, scripts/); docs/recipe.md
lists every key that differs from the paper or their code, and why.

Every key a run may set exists here; `--config.x.y=...` on an unknown key fails in the flag
parser, and lard_jax.pipeline.validate_config checks values before any device work.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = ""  # all outputs: checkpoints, metrics, hf_student/, report
    c.seed = 0  # PRNG seed: LoRA init, data order, evaluation sampling
    c.distributed = False  # jax.distributed.initialize() (TPU pod slices, multi-node GPU)
    c.compile_cache = True  # JAX's persistent compilation cache in <workdir>/jax_compilation_cache (reruns load)

    c.model = ml_collections.ConfigDict()  # the teacher checkpoint and numerics
    c.model.checkpoint = ""  # local Hugging Face directory of the teacher (required)
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "bfloat16"  # frozen weights' storage dtype
    c.model.trainable_dtype = "float32"  # the student's trainable projections (AdamW in float32)
    c.model.remat = "dots_no_batch_attention"  # none | full | dots | dots_no_batch | dots_no_batch_attention:
    #   the matmul outputs and cuDNN attention's residuals are kept, the rest recomputed (Llama-2-7B, T 4096, H200:
    #   8,225 tok/s at 48.0 GiB, the loop without remat 8,526 at 48.5; dots_no_batch reruns the attention forward:
    #   8,077 at 47.1; "none" keeps every elementwise intermediate under the scan: 64.8 GiB).
    #   docs/bench_restore_step.md, "Remat in the scan" and "Deviceless compile"
    c.model.scan_layers = True  # decoder layers under nn.scan, parameters stacked (False: a Python loop per layer)
    c.model.scan_grads = "compute_dtype"  # how the stacked layers are differentiated: compute_dtype (each layer's
    #   weight gradient leaves the backward scan in bf16, then float32: the same numbers, -3.1 GiB on Llama-2-7B)
    #   | jax (JAX's scan transpose: one float32 accumulator for the stacks); lard_jax/layer_scan.py
    c.model.attention_impl = "xla"  # xla (dense) | cudnn | blockwise (linear memory) | pallas_tpu | auto
    c.model.export_dtype = "checkpoint"  # hf_student/ dtype: checkpoint (GGUF: bf16) | float32 | bfloat16 | float16

    c.student = ml_collections.ConfigDict()  # the scaled-RoPE model being restored
    c.student.rope_scaling = ml_collections.ConfigDict({"rope_type": "linear", "factor": 8.0})  # transformers' dict
    #                        (linear | dynamic | yarn | longrope | llama3); JSON for the whole dict, or single keys
    c.student.max_position_embeddings = 0  # 0: teacher's x factor (what the scaled model claims)

    c.data = ml_collections.ConfigDict()  # training text
    c.data.source = ""  # text/JSONL/Parquet/Arrow file or folder, or a saved `datasets` dir (required)
    c.data.text_field = "text"  # the field holding the text in JSONL / Parquet / Arrow / datasets sources
    c.data.tokenizer = ""  # "" = the checkpoint's own; "byte" = built-in byte tokenizer
    c.data.seq_len = 4096  # the paper trains at the teacher's native length
    c.data.allow_long = False  # allow data.seq_len beyond the teacher's max_position_embeddings
    c.data.mode = "per_document"  # per_document (as the reference) | packed (segment ids)
    c.data.add_bos = True  # documents start with the tokenizer's bos token (when it has one)
    c.data.bos = "document"  # per_document mode: "document" = bos once, then the document cut into blocks
    #                          (authors' data_loader.py) | "every_block" = each block starts with bos
    c.data.cache_dir = ""  # "" = <workdir>/token_cache
    c.data.pad_short = False  # per_document: keep documents shorter than a block, padded (default: drop them)

    c.loss = ml_collections.ConfigDict()  # the restoration objective
    c.loss.method = "linearard"  # linearard | cpt | logit_kd | longred_simplified
    c.loss.normalize = "query_heads"  # row-KL sum / (valid tokens x QUERY heads) for Q, K and V (authors'
    #                                   train.py) | "per_relation_heads" (K, V divided by their KV heads)
    c.loss.relations = ("q", "k", "v")  # relations distilled: a subset of q, k, v
    c.loss.layers = ()  # () = all layers
    c.loss.lambda_attn = 1.0  # weight of the relation loss
    c.loss.lambda_logit = 0.0  # weight of an added logit-KD term (0 = none)
    c.loss.temperature = 1.0  # softmax temperature of relation rows and logits
    c.loss.kernel_impl = "auto"  # pallas_kernels.relation_kl impl
    c.loss.fused = True  # linearard: teacher and student layer by layer in one pass, each layer's relation KL
    #                      taken there (same loss; no layer's q/k/v outlive its step); False: after both forwards
    c.loss.hidden_layers = ()  # longred_simplified hidden-state layers, () = all
    c.loss.lambda_hidden = 1.0  # longred_simplified: weight of the hidden-state loss
    c.loss.lambda_short_to_long = 1.0  # longred_simplified: weight of the short-to-long term

    c.train = ml_collections.ConfigDict()  # stage 1: restoration training
    c.train.steps = 144  # optimizer steps (a resumed run may change it only with train.extend=True)
    c.train.batch_size = 2  # global sequences per micro-step
    c.train.grad_accum = 2  # micro-steps per optimizer step
    c.train.trainable = "qkv"  # qkv (paper and authors) | qkvo
    c.train.lora_rank = 1024  # authors: PEFT LoRA r 1024 on q/k/v; 0 = full fp32 copies of the projections
    c.train.lora_alpha = 2048.0  # scale alpha / r = 2
    c.train.lora_dropout = 0.05  # > 0: the LoRA path runs unmerged (dropout on its input), as PEFT
    c.train.lr = 2e-5  # peak learning rate (AdamW)
    c.train.warmup_steps = 4  # lr * step / warmup, 0 at step 0
    c.train.min_lr_ratio = 0.9  # then cosine to 0.9 x lr at the last step
    c.train.clip = 5.0  # global gradient-norm clip
    c.train.weight_decay = 0.01  # torch.optim.AdamW defaults (the authors pass only lr)
    c.train.b1 = 0.9  # AdamW beta1
    c.train.b2 = 0.999  # AdamW beta2
    c.train.eps = 1e-8  # AdamW epsilon
    c.train.log_every = 1  # write metrics every n steps
    c.train.checkpoint_every = 50  # orbax checkpoint every n steps and at step 1 (a killed run resumes from the last)
    c.train.keep_checkpoints = 2  # checkpoints kept on disk
    c.train.keep_checkpoints_after = False  # keep <workdir>/checkpoints once the run has finished (default: deleted)
    c.train.max_skipped_steps = 3  # a step with a non-finite loss or gradient norm is skipped (not applied);
    #                                past this many such steps the run stops
    c.train.crash_after_step = 0  # tests only: die (no clean shutdown) after this step's checkpoint
    c.train.nan_at_steps = ()  # fault drill: stage 1's loss and gradients at these steps (1-based) are made NaN
    c.train.extend = False  # resume a workdir with a different train.steps (the lr schedule stretches to it)
    c.train.retrain = False  # train again in a workdir whose run has finished (its checkpoints deleted): from step 0

    c.stage2 = ml_collections.ConfigDict()  # optional light CPT at the extended length
    c.stage2.steps = 0  # 0 = no stage 2
    c.stage2.seq_len = 0  # 0 = student max_position_embeddings
    c.stage2.batch_size = 1  # global sequences per micro-step
    c.stage2.grad_accum = 1  # micro-steps per optimizer step
    c.stage2.lr = 2e-5  # peak learning rate
    c.stage2.warmup_steps = 4  # linear warmup steps
    c.stage2.min_lr_ratio = 0.1  # cosine decay to this x lr

    c.mesh = ml_collections.ConfigDict()  # the device mesh: data x fsdp x tensor
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.fsdp = 1  # parameter-sharding (FSDP) axis size
    c.mesh.tensor = 1  # tensor-parallel axis size
    c.mesh.num_devices = 0  # 0 = all devices; n = only the first n (debugging, equivalence tests)
    c.mesh.rules = ()  # (("embed", None), ("mlp", "tensor")): replaces those logical axes' rules; () = DEFAULT_RULES

    c.eval = ml_collections.ConfigDict()  # held-out evaluation after training
    c.eval.enabled = False  # evaluate teacher / scaled / restored and write the report
    c.eval.source = ""  # held-out documents ("" = none)
    c.eval.max_windows = 32  # perplexity windows per length
    c.eval.passkey_lengths = ()  # () = 4x native
    c.eval.passkey_samples = 20  # passkey prompts per length, split over the depths
    c.eval.ppl_lengths = ()  # extra perplexity lengths (() = native only)
    c.eval.niah_tasks = ("niah_single",)  # needle variants: niah_single | niah_multikey | niah_multikey_2 | ...
    c.eval.niah_lengths = ()  # needle-in-a-haystack lengths (() = none)
    c.eval.depths = (0.1, 0.5, 0.9)  # needle depths, as fractions of the context
    c.eval.cloze_samples = 0  # held-out 4-way cloze questions (0 = none)
    c.eval.harness_tasks = ""  # "lambada=/data/lambada.jsonl,piqa=/data/piqa.jsonl"
    c.eval.add_bos = "tokenizer"  # cloze/harness_tasks bos: tokenizer (its default, as lm-eval's hf) | always | never
    c.eval.max_length = 0  # cloze/harness_tasks left truncation in tokens; 0 = each model's max_position_embeddings
    c.eval.tasks = ()  # evaluation tasks by registered name, in order; () = all (lard_jax.evaluation.tasks)
    c.eval.native_len = 0  # 0 = data.seq_len
    c.eval.distortion = True  # per-layer/head relation distortion against the teacher
    c.eval.stop_at_eos = False  # synthetic tasks stop decoding at eos (faster; text after it no longer scores)
    return c
