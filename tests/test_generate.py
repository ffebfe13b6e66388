"""KV-cache greedy decoding against transformers' generate() and against full recomputation."""

import jax
import numpy as np
import pytest
import torch
import transformers

from lard_jax import compile_cache, hf
from lard_jax import generate as gen
from lard_jax.evaluation import runner as eval_runner
from lard_jax.model import LlamaConfig, init_params

TEACHER = "lard_jax/assets/tiny_teacher"
NEW = 16
MAX_POS = 24  # random models: generation runs past it, so dynamic / longrope change frequencies mid-way
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 24.0, "beta_slow": 2.0},
    "longrope": "random",
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def _hf_generate(ref, prompt, new_tokens):
    rotary = ref.model.rotary_emb  # dynamic NTK keeps grown frequencies across calls: start fresh, as ours does
    if hasattr(rotary, "original_inv_freq"):
        rotary.inv_freq = rotary.original_inv_freq.clone()
        rotary.max_seq_len_cached = rotary.original_max_seq_len
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )
    return out[0, len(prompt) :].tolist()


def _random_checkpoint(tmp_path, rope_name):
    rng = np.random.default_rng(list(ROPES).index(rope_name))
    rope = ROPES[rope_name]
    if rope == "random":
        rope = {
            "rope_type": "longrope",
            "short_factor": list(rng.uniform(1, 2, 8)),
            "long_factor": list(rng.uniform(2, 6, 8)),
            "original_max_position_embeddings": 12,
        }
    torch.manual_seed(int(rng.integers(1 << 30)))
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rope_theta=10000.0,
        attention_bias=False,
        tie_word_embeddings=False,
        rope_scaling=rope,
    )
    ref = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked logits: weights well above the default init
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    path = str(tmp_path / rope_name)
    ref.save_pretrained(path)
    return ref, path, rng


@pytest.mark.parametrize("rope_name", list(ROPES))
def test_random_llama_matches_transformers(tmp_path, rope_name):
    ref, path, rng = _random_checkpoint(tmp_path, rope_name)
    model, params = hf.load_pretrained(path)
    # prompts below max_position_embeddings (and around longrope's original 12), generation past them
    prompts = [rng.integers(3, 97, n).tolist() for n in (5, 11, 8)]
    expected = [_hf_generate(ref, p, NEW) for p in prompts]
    batched = gen.greedy_generate(model, params, prompts, NEW, bucket=32)
    assert batched == expected
    if rope_name in gen.LENGTH_DEPENDENT_ROPE:
        # per-row frequencies: batched equals one by one (HF's own left-padded batch would not)
        assert [gen.greedy_generate(model, params, [p], NEW, bucket=32)[0] for p in prompts] == expected
        # Without a cache every key is re-rotated at the current length's frequencies: the same
        # model only while no length passes the rope's threshold (5 + 6 <= 12 <= 24).
        short = gen.greedy_generate(model, params, [p[:5] for p in prompts], 6, bucket=32)
        assert short == [gen.greedy_generate_recompute(model, params, p[:5], 6, bucket=32) for p in prompts]
    else:
        assert batched == [gen.greedy_generate_recompute(model, params, p, NEW, bucket=32) for p in prompts]


def test_tiny_teacher_matches_transformers_and_recomputation():
    model, params = hf.load_pretrained(TEACHER)
    ref = transformers.AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    text = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    prompts = [[1] + [c + 3 for c in text[:n]] for n in (20, 40, 35)]  # byte ids are offset by 3
    batched = gen.greedy_generate(model, params, prompts, 20)  # one (width 64, cache 64) bucket
    assert batched == [_hf_generate(ref, p, 20) for p in prompts]
    # eval_runner's generate_fn (passkey, NIAH, ...) decodes with the cache, one prompt at a time,
    # and equals recomputation
    fn = eval_runner.generate_fn_for(model, params)
    for p, expected in zip(prompts, batched):
        assert fn(p, 20) == expected == gen.greedy_generate_recompute(model, params, p, 20)


def test_eos_cut_batch_padding_and_blockwise_prefill():
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda x: x * 20 if x.ndim == 2 else x, params)
    prompts = [[1, 6, 7, 8], [1, 7], [1, 8, 9], [1, 9, 10, 11, 12]]
    full = gen.greedy_generate(model, params, prompts, 6, batch_size=3)  # a padded last batch of 1
    assert [len(x) for x in full] == [6] * 4
    assert full == gen.greedy_generate(model, params, prompts, 6, batch_size=8)
    # prefill through the linear-memory attention: the same tokens
    blockwise = model.__class__(cfg.replace(attention_impl="blockwise"))
    assert gen.greedy_generate(blockwise, params, prompts, 6, batch_size=8) == full
    eos = full[0][2]
    cut = gen.greedy_generate(model, params, prompts[:3], 6, eos_id=eos, batch_size=3)[0]
    assert cut == full[0][: full[0].index(eos) + 1]
    assert gen.greedy_generate(model, params, prompts, 0) == [[]] * 4


def _peaked_model(seed):
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model, params = init_params(cfg, jax.random.PRNGKey(seed))
    return model, jax.tree_util.tree_map(lambda x: x * 20 if x.ndim == 2 else x, params)


def _cut(ids, stops):
    first = next((k for k, t in enumerate(ids) if t in stops), None)
    return ids if first is None else ids[: first + 1]


def _staggered_eos(full):
    """A token some rows emit first at different steps and at least one row never emits, or None."""
    for tok in sorted({t for row in full for t in row}):
        firsts = [row.index(tok) if tok in row else None for row in full]
        hit = {f for f in firsts if f is not None}
        if None in firsts and len(hit) >= 2:
            return tok
    return None


def test_eos_stops_the_loop_early_with_the_full_decodes_tokens():
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh inputs each run; the seed is in the messages
    model, params = _peaked_model(seed % 1000)
    rng = np.random.default_rng(seed)
    new = 24
    for _ in range(20):  # draw until some token stops rows at different steps and misses one row
        prompts = [rng.integers(1, 50, int(n)).tolist() for n in rng.integers(3, 20, 6)]
        full, produced = gen._greedy_generate(model, params, prompts, new)
        eos = _staggered_eos(full)
        if eos is not None:
            break
    assert eos is not None, f"seed {seed}: no staggered eos in 20 draws"
    assert produced == [new] and [len(r) for r in full] == [new] * 6, seed
    # (a) the full decode is the cached decode of before (equal to recomputation without a cache)
    assert full == [gen.greedy_generate_recompute(model, params, p, new) for p in prompts], seed
    got, produced = gen._greedy_generate(model, params, prompts, new, eos_id=eos)
    assert got == [_cut(r, {eos}) for r in full], seed
    assert any(eos not in r for r in got) and len({len(r) for r in got if r[-1] == eos}) >= 2, seed
    assert produced == [new], seed  # a row never stopped: the loop ran to the end
    assert gen.greedy_generate(model, params, prompts, new, eos_id=eos) == got
    # (b) every row stops: the loop ends at the last row's first eos, well before max_new_tokens
    step = int(rng.integers(1, 6))
    stops = sorted({r[step] for r in full[:4]})  # <= 4 ids: the same compiled program
    got, produced = gen._greedy_generate(model, params, prompts[:4], new, eos_id=stops)
    assert got == [_cut(r, set(stops)) for r in full[:4]], seed
    assert produced == [max(len(r) for r in got)] and produced[0] <= step + 1 < new, (seed, produced)
    one, produced = gen._greedy_generate(model, params, prompts[:1], new, eos_id=full[0][step])
    assert one == [_cut(full[0], {full[0][step]})] and produced == [len(one[0])] and produced[0] < new, seed
    # batches of one model call: each batch stops on its own
    got, produced = gen._greedy_generate(model, params, prompts[:4], new, eos_id=stops, batch_size=2)
    assert got == [_cut(r, set(stops)) for r in full[:4]], seed
    assert len(produced) == 2 and max(produced) <= step + 1, (seed, produced)


def test_one_decode_program_serves_every_eos_and_model():
    model, params = _peaked_model(3)
    _, other_params = _peaked_model(4)  # another model of the same program config
    rng = np.random.default_rng()
    prompts = [rng.integers(1, 50, int(n)).tolist() for n in rng.integers(3, 20, 4)]
    full = gen.greedy_generate(model, params, prompts, 20)  # compiles (or reuses) the programs
    first, second = full[0][1], full[1][4]
    with compile_cache.CompileCounter() as counter:
        a = gen.greedy_generate(model, params, prompts, 20, eos_id=first)
        b = gen.greedy_generate(model, params, prompts, 20, eos_id=second)
        c = gen.greedy_generate(model, params, prompts, 20, eos_id=[second, first])
        gen.greedy_generate(model, other_params, prompts, 20, eos_id=second)
        gen.greedy_generate(model, params, prompts, 9, eos_id=first)  # another step count, same cap
    assert counter.compiles == 0, counter.names
    assert a == [_cut(r, {first}) for r in full] and b == [_cut(r, {second}) for r in full]
    assert c == [_cut(r, {first, second}) for r in full]
    with pytest.raises(ValueError, match="eos ids must be >= 0"):
        gen.greedy_generate(model, params, prompts, 4, eos_id=-1)
