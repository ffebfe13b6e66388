"""lard_jax.plan: a run resolved and checked before any weight is read, and the pipeline executing
exactly what the plan says (rope normalised once, specs built from the plan). Also: a new loss
method is one registration, usable by the trainer at once."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lard_jax import hf, methods, pipeline, plan, safetensors_io, trainer
from lard_jax import rope as rope_lib
from lard_jax.errors import UserError
from lard_jax.model import LlamaConfig, init_params
from tests.tiny import save_tiny_teacher


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    save_tiny_teacher(d / "teacher", seed=41, max_position_embeddings=32)
    rng = np.random.default_rng(42)
    words = "north south east west river hill stone field cloud rain".split()
    (d / "data").mkdir()
    for i in range(10):
        (d / "data" / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 60)))
    return d


def _config(assets, tmp_path, **rope):
    c = base.get_config()
    c.workdir = str(tmp_path / "run")
    c.model.checkpoint = str(assets / "teacher")
    c.data.source = c.eval.source = str(assets / "data")
    c.model.dtype = c.model.param_dtype = "float32"
    c.data.seq_len, c.train.steps, c.train.batch_size, c.train.grad_accum = 16, 3, 4, 1
    c.train.lora_rank, c.train.lora_dropout = 0, 0.0
    c.mesh.num_devices, c.mesh.data = 1, 1
    c.student.rope_scaling = rope or {"rope_type": "yarn", "factor": 4.0}
    return c


def _refuse(*a, **k):
    raise AssertionError("a weight was read while planning")


def test_resolve_reads_no_weight_and_derives_every_field(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "load_pretrained", _refuse)
    monkeypatch.setattr(safetensors_io, "open_tensors", _refuse)
    c = _config(assets, tmp_path)
    c.stage2.steps, c.stage2.batch_size, c.stage2.lr = 2, 4, 7e-5
    c.eval.enabled, c.eval.max_windows, c.eval.passkey_lengths = True, 2, (512,)
    p = plan.resolve(c)

    want_rope = rope_lib.normalize_rope_scaling({"rope_type": "yarn", "factor": 4.0})
    assert p.rope == want_rope
    assert p.teacher.max_position_embeddings == 32 and p.student_max_positions == 128
    assert p.student.rope_scaling_dict == want_rope and p.student.max_position_embeddings == 128
    assert p.student.replace(rope_scaling=None, max_position_embeddings=32) == p.teacher
    assert p.config.data.source == str(assets / "data") and p.mesh_shape == {"data": 1, "fsdp": 1, "tensor": 1}
    s1, s2 = p.stages
    assert (s1.name, s1.loss.method, s1.steps, s1.batch_size, s1.seq_len) == ("stage1", "linearard", 3, 4, 16)
    assert s1.loss == trainer.LossSpec.from_config(c.loss, long_factor=4.0)
    assert s1.optimizer == plan.optimizer_kwargs(c.train) and s1.optimizer["lr"] == c.train.lr
    assert (s2.name, s2.loss.method, s2.seq_len, s2.optimizer["lr"]) == ("stage2_cpt", "cpt", 128, 7e-5)
    assert s1.loader.num_blocks > 0 and s2.loader is not None
    assert p.train_tokens == 3 * 4 * 16 + 2 * 4 * 128
    assert p.eval.passkey_lengths == (512,) and len(p.eval_docs) == 10
    assert p.rules == pipeline.sharding_lib.DEFAULT_RULES


def test_longred_factor_and_student_positions_share_one_default(assets, tmp_path):
    c = _config(assets, tmp_path, rope_type="linear", factor=2.0)
    c.loss.method = "longred_simplified"
    p = plan.resolve(c, build_loaders=False)
    assert p.stages[0].loss.long_factor == 2.0 and p.student_max_positions == 64
    assert p.stages[0].loader is None


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda c: setattr(c.student, "rope_scaling", {"rope_type": "warp", "factor": 2.0}), "rope_scaling"),
        (lambda c: setattr(c.loss, "layers", (7,)), "config.loss.layers"),
        (lambda c: setattr(c.mesh, "rules", (("nonsense", "data"),)), "config.mesh.rules"),
        (lambda c: setattr(c.eval, "enabled", True) or setattr(c.eval, "source", ""), "config.eval.source"),
        (lambda c: setattr(c.data, "seq_len", 64), "allow_long"),
    ],
)
def test_bad_inputs_fail_in_resolve(assets, tmp_path, monkeypatch, change, fragment):
    monkeypatch.setattr(hf, "load_pretrained", _refuse)
    c = _config(assets, tmp_path)
    change(c)
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        plan.resolve(c)


def test_pipeline_builds_the_planned_student(assets, tmp_path):
    c = _config(assets, tmp_path)
    p = plan.resolve(c, build_loaders=False)
    teacher, student, frozen = pipeline.build_models(p, p.make_mesh())
    numerics = dict(dtype=teacher.config.dtype, param_dtype=teacher.config.param_dtype)
    assert student.config.rope_scaling_dict == p.rope
    assert student.config.max_position_embeddings == p.student_max_positions
    assert student.config == p.student.replace(
        **numerics, remat=c.model.remat, attention_impl=c.model.attention_impl, scan_layers=c.model.scan_layers
    )


# ----------------------------------------------------------------------------------------------
# a new method: one registration
@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    weight: float = 1.0


def test_a_new_method_is_one_registration(monkeypatch):
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))  # leave the real registry as it was

    @methods.register("toy_qproj_l2", _ToyConfig, teacher_forward=False)
    def build(ctx, cfg):
        def loss_fn(trainable, frozen, batch, rng):
            leaves = jax.tree_util.tree_leaves(trainable)
            loss = cfg.weight * sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in leaves)
            return loss, {"l2": loss}

        return loss_fn

    assert "toy_qproj_l2" in methods.names()
    with pytest.raises(ValueError, match="no option"):
        trainer.LossSpec(method="toy_qproj_l2", temperature=2.0)
    spec = trainer.LossSpec(method="toy_qproj_l2", weight=0.5)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model, params = init_params(cfg, jax.random.PRNGKey(3))
    mask = trainer.trainable_mask(params, trainer.PROJECTION_SETS["qkv"])
    lora = trainer.LoraSpec(rank=0)
    trainable = trainer.init_trainable(params, mask, lora, jax.random.PRNGKey(4))
    optimizer, schedule = trainer.make_optimizer(lr=1e-2, warmup_steps=0, total_steps=3, weight_decay=0.0)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), jax.random.PRNGKey(5))
    step = jax.jit(trainer.make_train_step(model, model, spec, lora, optimizer, schedule))
    ids = jax.random.randint(jax.random.PRNGKey(6), (1, 2, 8), 0, 64)
    before = float(0.5 * sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree_util.tree_leaves(trainable)))
    state, metrics = step(state, params, {"input_ids": ids})
    np.testing.assert_allclose(float(metrics["loss"]), before, rtol=1e-5)
    after = float(0.5 * sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree_util.tree_leaves(state.trainable)))
    assert after < before


def test_a_stage_says_how_often_it_reads_its_text_and_warns_when_it_drops_and_repeats(assets, tmp_path):
    data = tmp_path / "uneven"
    data.mkdir()
    rng = np.random.default_rng(7)
    for i, n in enumerate([400, 20, 25, 18, 22, 28]):  # one long document, five shorter than a block
        (data / f"d{i}.txt").write_text("".join(rng.choice(list("abcdefgh "), n)))
    c = _config(assets, tmp_path)
    c.data.source = c.eval.source = str(data)
    c.data.seq_len, c.train.steps, c.train.batch_size = 32, 30, 2
    with pytest.warns(UserWarning, match="repeats few blocks while documents shorter than a block are dropped"):
        p = plan.resolve(c)
    s = p.stages[0]
    blocks = s.loader.num_blocks
    assert s.loader.dropped_documents == 5 and blocks == 400 // 31  # bos in every block: 31 text tokens each
    assert s.data_passes == pytest.approx(30 * 2 / blocks)
    assert f"read {blocks} distinct blocks" in s.describe_data() and "5 short documents dropped" in s.describe_data()

    c.data.mode = "packed"  # every document in one stream: more blocks, nothing dropped, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = plan.resolve(c).stages[0]
    assert packed.loader.num_blocks > blocks and "packed mode" in packed.describe_data()
    assert "dropped" not in packed.describe_data()
