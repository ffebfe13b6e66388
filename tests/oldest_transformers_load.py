"""Run by tests/test_export_compat.py with ANOTHER Python: a venv holding only the oldest transformers
that requirements.txt admits (no torch, no lard_jax). Loads each export listed in a JSON file with
AutoTokenizer and AutoConfig and checks what the main environment computed.

    python tests/oldest_transformers_load.py expected.json
"""

import json
import sys


def main(path: str) -> None:
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    with open(path) as f:
        expected = json.load(f)
    print(f"transformers {transformers.__version__}")
    assert transformers.__version__.startswith(expected["version"] + "."), (
        f"expected transformers {expected['version']}.*, this venv has {transformers.__version__}"
    )
    for case in expected["exports"]:
        out = case["dir"]
        tok = AutoTokenizer.from_pretrained(out)
        for text, want, want_special in zip(case["texts"], case["ids"], case["ids_special"]):
            got = tok.encode(text, add_special_tokens=False)
            assert got == want, (out, text, got, want)
            assert tok(text)["input_ids"] == want_special, (out, text)
            assert tok.decode(got) == tok.decode(want)
        if case.get("chat"):
            chat = tok.apply_chat_template(case["chat"]["messages"], tokenize=False, add_generation_prompt=True)
            assert chat == case["chat"]["text"], (chat, case["chat"]["text"])
        config = AutoConfig.from_pretrained(out)
        rope = {k: v for k, v in (config.rope_scaling or {}).items() if k != "rope_theta"}
        assert rope == case["rope_scaling"], (out, config.rope_scaling)
        assert config.max_position_embeddings == case["max_position_embeddings"]
        print(f"ok {out}: {type(tok).__name__}, rope {rope}")


if __name__ == "__main__":
    main(sys.argv[1])
