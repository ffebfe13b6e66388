"""Defaults shared by every restoration config: the paper's recipe where it gives one.

Every key a run may set exists here; `--config.x.y=...` on an unknown key fails in the flag
parser, and lard_jax.pipeline.validate_config checks values before any device work.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = ""  # all outputs: checkpoints, metrics, hf_student/, report
    c.seed = 0
    c.distributed = False  # jax.distributed.initialize() (TPU pod slices, multi-node GPU)

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # local Hugging Face directory of the teacher (required)
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "bfloat16"  # frozen weights' storage dtype
    c.model.trainable_dtype = "float32"  # the student's trainable projections (AdamW in float32)
    c.model.remat = "none"  # none | full | dots | dots_no_batch
    c.model.attention_impl = "xla"  # xla | cudnn

    c.student = ml_collections.ConfigDict()
    c.student.rope_scaling = ml_collections.ConfigDict({"rope_type": "linear", "factor": 8.0})
    c.student.max_position_embeddings = 0  # 0: teacher's x factor (what the scaled model claims)

    c.data = ml_collections.ConfigDict()
    c.data.source = ""  # text/JSONL/Parquet/Arrow file or folder, or a saved `datasets` dir (required)
    c.data.text_field = "text"
    c.data.tokenizer = ""  # "" = the checkpoint's own; "byte" = built-in byte tokenizer
    c.data.seq_len = 4096  # the paper trains at the teacher's native length
    c.data.mode = "per_document"  # per_document (as the reference) | packed (segment ids)
    c.data.add_bos = True
    c.data.cache_dir = ""  # "" = <workdir>/token_cache

    c.loss = ml_collections.ConfigDict()
    c.loss.method = "linearard"  # linearard | cpt | logit_kd | longred
    c.loss.relations = ("q", "k", "v")
    c.loss.layers = ()  # () = all layers
    c.loss.lambda_attn = 1.0
    c.loss.lambda_logit = 0.0
    c.loss.temperature = 1.0
    c.loss.kernel_impl = "auto"  # pallas_kernels.relation_kl impl
    c.loss.hidden_layers = ()  # LongReD hidden-state layers, () = all
    c.loss.lambda_hidden = 1.0
    c.loss.lambda_short_to_long = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 144
    c.train.batch_size = 2  # global sequences per micro-step
    c.train.grad_accum = 2
    c.train.trainable = "qkv"  # qkv (paper) | qkvo
    c.train.lora_rank = 0  # 0 = full fine-tuning of the projections
    c.train.lora_alpha = 16.0
    c.train.lr = 2e-5
    c.train.warmup_steps = 4
    c.train.min_lr_ratio = 0.9
    c.train.clip = 5.0
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.log_every = 1
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    c.train.crash_after_step = 0  # tests only: die (no clean shutdown) after this step's checkpoint

    c.stage2 = ml_collections.ConfigDict()  # optional light CPT at the extended length
    c.stage2.steps = 0
    c.stage2.seq_len = 0  # 0 = student max_position_embeddings
    c.stage2.batch_size = 1
    c.stage2.grad_accum = 1
    c.stage2.lr = 2e-5
    c.stage2.warmup_steps = 4
    c.stage2.min_lr_ratio = 0.1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0  # 0 = all devices; n = only the first n (debugging, equivalence tests)

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = False  # evaluate teacher / scaled / restored and write the report
    c.eval.source = ""  # held-out documents ("" = none)
    c.eval.max_windows = 32
    c.eval.passkey_lengths = ()  # () = 4x native
    c.eval.passkey_samples = 20
    c.eval.ppl_lengths = ()
    c.eval.niah_lengths = ()
    c.eval.depths = (0.1, 0.5, 0.9)
    c.eval.cloze_samples = 0
    c.eval.harness_tasks = ""  # "lambada=/data/lambada.jsonl,piqa=/data/piqa.jsonl"
    c.eval.native_len = 0  # 0 = data.seq_len
    c.eval.distortion = True
    return c
